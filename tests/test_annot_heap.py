"""The heap scope around CPU annotator runs: large blocks reused inside, glibc's usual behaviour restored after."""
from __future__ import annotations

import resource

import pytest
import torch

from annotators import heap

pytestmark = pytest.mark.skipif(not heap.enabled(), reason="needs Linux with glibc (mallopt)")

BLOCK = 64 << 20  # above glibc's largest mmap threshold: without the scope, always a fresh mapping


def faults_of_a_fresh_block() -> int:
    """Minor page faults taken by allocating and touching one 64 MiB tensor (freed again on return)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(BLOCK // 4, dtype=torch.float32)
    t.fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del t
    return faults


def reused_inside() -> int:
    """Fewest faults of three fresh blocks after a first one has grown the heap (on 2 threads an occasional block
    is still faulted in: the best of three is the steady state)."""
    faults_of_a_fresh_block()
    return min(faults_of_a_fresh_block() for _ in range(3))


def test_inside_the_scope_a_large_block_is_reused_and_after_it_is_mapped_afresh():
    with heap.reuse_large_blocks():
        inside = reused_inside()
    after = faults_of_a_fresh_block()
    assert inside < 500  # 64 MiB is 16384 pages: reused, not faulted in again
    # malloc_trim on leaving gave the pages back: a new block is faulted in again (16384 faults with 4 KiB pages,
    # 32 with 2 MiB huge pages)
    assert after > max(inside, 16)


def test_scopes_nest_and_only_the_outermost_restores():
    with heap.reuse_large_blocks():
        with heap.reuse_large_blocks():
            faults_of_a_fresh_block()
        assert heap._depth == 1
        still_inside = reused_inside()
    assert heap._depth == 0 and still_inside < 500


def test_CNS_HEAP_REUSE_0_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("CNS_HEAP_REUSE", "0")
    monkeypatch.setattr(heap, "glibc", lambda: pytest.fail("the C library was touched with CNS_HEAP_REUSE=0"))
    with heap.reuse_large_blocks():
        assert heap._depth == 0
        faults_of_a_fresh_block()
    assert heap._depth == 0


def test_a_cpu_annotator_run_uses_the_scope_and_restores_it(tmp_path, monkeypatch):
    from factories import randomize_

    from annotators.hed import ControlNetHED, HEDDetector

    torch.save(randomize_(ControlNetHED(), 0).state_dict(), tmp_path / "ControlNetHED.pth")
    det = HEDDetector.from_file(tmp_path / "ControlNetHED.pth")
    depths = []
    real = det.annotate
    monkeypatch.setattr(det, "annotate", lambda images, **kw: (depths.append(heap._depth), real(images, **kw))[1])
    out = det(torch.rand(2, 3, 64, 64), resolution=64)
    assert out.shape == (2, 3, 64, 64) and depths == [1, 1]  # both images inside one scope (one per CPU call)
    assert heap._depth == 0 and faults_of_a_fresh_block() > 16
