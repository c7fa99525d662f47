"""The annotator registry's cache and the weight files' hash check: a file is hashed once per state, the cache is
looked at before any hashing, and a file changed on disk is hashed again (and refused when it is not the published one).
Also the common base of the network annotators: built from files, device and dtype from the parameters, explicit networks.

Real files on disk (a random-weight M-LSD tiny file, 2.6 MB, whose SHA-256 stands in for the published one); the
hashing function is counted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import pytest
import torch
from factories import randomize_

from annotators import base, depth, hed, lineart, mlsd, openpose, pidinet, registry, segmentation, weights


@pytest.fixture
def hashed(monkeypatch) -> list:
    """Paths passed to the hashing function from now on; the process's digest memory and the registry start empty."""
    calls = []
    real = weights.sha256_of

    def counting(path, *a, **kw):
        calls.append(os.path.realpath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(weights, "sha256_of", counting)
    monkeypatch.setattr(weights, "_DIGESTS", {})
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.delenv("CNS_SKIP_HASH_CHECK", raising=False)
    return calls


@pytest.fixture
def tiny_file(tmp_path, monkeypatch):
    """mlsd_tiny_512_fp32.pth with random weights, and the manifest entry pinned to its SHA-256."""
    path = tmp_path / mlsd.TINY_FILE
    torch.save(randomize_(mlsd.MLSDTiny(), 0).state_dict(), path)
    spec = weights.MANIFEST[mlsd.TINY_FILE]
    monkeypatch.setitem(weights.MANIFEST, mlsd.TINY_FILE, dataclasses.replace(spec, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                                                             size=path.stat().st_size))
    return path


def rewrite(path, data: bytes, mtime_ns: int) -> None:
    """New contents, then the given modification time (the change time is the kernel's: now)."""
    time.sleep(0.05)  # past the file system's timestamp tick, so the change time really moves
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_the_second_load_hashes_nothing(hashed, tiny_file):
    det = registry.load("mlsd_tiny", dirs=[tiny_file.parent])
    assert hashed == [str(tiny_file.resolve())]  # verified once, on first use
    for _ in range(3):
        assert registry.load("mlsd_tiny", dirs=[tiny_file.parent]) is det
    assert len(hashed) == 1  # the cache came first: no hashing
    # another device/dtype builds another annotator from the same, unchanged file: not hashed again either
    other = registry.load("mlsd_tiny", dirs=[tiny_file.parent], dtype=torch.bfloat16)
    assert other is not det and other.dtype == torch.bfloat16 and len(hashed) == 1


def test_a_modified_file_is_verified_again_and_refused(hashed, tiny_file):
    good = tiny_file.read_bytes()
    det = registry.load("mlsd_tiny", dirs=[tiny_file.parent])
    st = tiny_file.stat()
    bad = bytearray(good)
    bad[-100] ^= 0xFF  # same size, other contents
    rewrite(tiny_file, bytes(bad), st.st_mtime_ns + 1_000_000_000)
    with pytest.raises(weights.AnnotatorWeightsError, match=r"mlsd_tiny_512_fp32\.pth: SHA-256 .* does not match"):
        registry.load("mlsd_tiny", dirs=[tiny_file.parent])
    assert len(hashed) == 2
    with pytest.raises(weights.AnnotatorWeightsError, match="does not match"):  # refused every time, hashed once
        registry.load("mlsd_tiny", dirs=[tiny_file.parent])
    assert len(hashed) == 2
    # the published contents again, with the modification time set back to the first one's: the change time differs
    rewrite(tiny_file, good, st.st_mtime_ns)
    again = registry.load("mlsd_tiny", dirs=[tiny_file.parent])
    assert len(hashed) == 3 and again is not det  # verified again and rebuilt from the file as it is now
    assert registry.load("mlsd_tiny", dirs=[tiny_file.parent]) is again and len(hashed) == 3


def test_a_file_taken_without_the_check_is_verified_once_the_check_is_on(hashed, tiny_file, monkeypatch):
    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")
    det = registry.load("mlsd_tiny", dirs=[tiny_file.parent])
    assert hashed == []
    monkeypatch.delenv("CNS_SKIP_HASH_CHECK")
    assert registry.load("mlsd_tiny", dirs=[tiny_file.parent]) is det and len(hashed) == 1
    assert registry.load("mlsd_tiny", dirs=[tiny_file.parent]) is det and len(hashed) == 1


def test_file_sha256_keeps_no_digest_of_a_file_that_changed_while_it_was_read(hashed, tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    real = weights.sha256_of

    def hash_then_touch(p, *a, **kw):
        digest = real(p, *a, **kw)
        os.utime(p, ns=(1, 1))  # the file changes under the reader
        return digest

    monkeypatch.setattr(weights, "sha256_of", hash_then_touch)
    weights.file_sha256(path)
    assert weights._DIGESTS == {}  # may mix two versions: not kept
    monkeypatch.setattr(weights, "sha256_of", real)
    assert weights.file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert list(weights._DIGESTS) == [os.path.realpath(path)]


def test_find_uses_the_same_memory(hashed, tiny_file):
    for _ in range(3):
        assert weights.find(mlsd.TINY_FILE, [tiny_file.parent]) == tiny_file
    assert len(hashed) == 1


def test_switched_weights_must_name_a_file_and_a_boolean():
    with pytest.raises(ValueError, match="switched weight file"):
        registry.AnnotatorInfo(key="x", title="x", build=lambda *a, **k: None, params=[registry.Param("flag", "INT", 0)],
                               weights=["a.pth"], switched_weights={"a.pth": "flag"})
    info = registry.AnnotatorInfo(key="x", title="x", build=lambda *a, **k: None, params=[registry.Param("flag", "BOOLEAN", False)],
                                  weights=["a.pth", "b.pth"], switched_weights={"b.pth": "flag"})
    assert info.weights_for(None) == ["a.pth", "b.pth"]  # no params: every file, as before
    assert info.weights_for({}) == ["a.pth"] and info.weights_for({"flag": True}) == ["a.pth", "b.pth"]


# --- the common base of the network annotators ---------------------------------------------------------------


NETWORK_ANNOTATORS = {
    "hed": hed.HEDDetector, "pidinet": pidinet.PiDiNetDetector, "lineart": lineart.LineartDetector,
    "lineart_coarse": lineart.CoarseLineartDetector, "mlsd": mlsd.MLSDDetector, "mlsd_tiny": mlsd.TinyMLSDDetector,
    "depth_anything_v2": depth.DepthAnythingV2Detector, "seg_uniformer": segmentation.UniformerSegDetector,
    "openpose": openpose.OpenPoseDetector,
}


def test_every_annotator_with_weights_is_a_network_annotator():
    with_weights = {k for k, info in registry.load_all().items() if info.weights}
    assert with_weights == set(NETWORK_ANNOTATORS)
    for cls in NETWORK_ANNOTATORS.values():
        assert issubclass(cls, base.NetworkAnnotator)
    # one loader for the single-network detectors: HED and PiDiNet (and the others) share it
    shared = base.SingleNetworkAnnotator.from_file.__func__
    assert hed.HEDDetector.from_file.__func__ is shared and pidinet.PiDiNetDetector.from_file.__func__ is shared
    assert lineart.LineartDetector.from_file.__func__ is shared and depth.DepthAnythingV2Detector.from_file.__func__ is shared


def test_device_and_dtype_are_read_from_the_parameters(tmp_path):
    path = tmp_path / hed.FILENAME
    torch.save(randomize_(hed.ControlNetHED(), 0).state_dict(), path)
    det = hed.HEDDetector.from_file(path)
    assert det.networks() == [det.model] and det.device == torch.device("cpu") and det.dtype == torch.float32
    det.model.to(torch.bfloat16)  # as the host's memory manager moves a network: the annotator follows
    assert det.dtype == torch.bfloat16


def test_a_network_annotator_without_switched_files_refuses_one(tmp_path):
    path = tmp_path / mlsd.TINY_FILE
    torch.save(randomize_(mlsd.MLSDTiny(), 0).state_dict(), path)
    det = mlsd.TinyMLSDDetector.from_file(path)
    with pytest.raises(base.AnnotatorError, match="takes all its weight files when it is built"):
        det.attach_weights({"extra.pth": path})


def test_a_file_that_is_no_checkpoint_names_the_file_and_the_network(tmp_path):
    page = tmp_path / hed.FILENAME
    page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(weights.AnnotatorWeightsError, match=r"ControlNetHED\.pth.*Expected the ControlNetHED"):
        hed.HEDDetector.from_file(page)


# --- one registration call, one resolution declaration, one chunk loop -----------------------------------------


def test_register_puts_the_published_files_in_the_manifest_with_the_annotators_licence_and_key(monkeypatch):
    monkeypatch.setattr(registry, "ANNOTATORS", dict(registry.ANNOTATORS))
    monkeypatch.setattr(weights, "MANIFEST", dict(weights.MANIFEST))
    info = registry.AnnotatorInfo(key="x", title="x", build=lambda *a, **k: None, weights=["a.pth", "b.pth"], licence="MIT")
    registry.register(info, registry.Published("a.pth", "0" * 64, 10), registry.Published("b.pth", None, None, url="https://example.invalid/b"))
    assert registry.ANNOTATORS["x"] is info
    a, b = weights.MANIFEST["a.pth"], weights.MANIFEST["b.pth"]
    assert (a.url, a.sha256, a.size, a.licence, a.model) == (weights.ANNOTATORS_REPO + "a.pth", "0" * 64, 10, "MIT", "x")
    assert (b.url, b.sha256, b.licence, b.model) == ("https://example.invalid/b", None, "MIT", "x")
    with pytest.raises(ValueError, match=r"published weight file 'c\.pth' is not one of its weight files"):
        registry.register(dataclasses.replace(info, key="y"), registry.Published("c.pth", None, None))
    assert "y" not in registry.ANNOTATORS and "c.pth" not in weights.MANIFEST


def test_every_weight_file_is_published_by_the_annotator_that_names_it():
    infos = registry.load_all()
    for key, info in infos.items():
        for f in info.weights:
            spec = weights.MANIFEST[f]
            assert spec.model == key and spec.licence == info.licence, (key, f)


def test_each_annotator_declares_its_resolution_once():
    infos = registry.load_all()
    assert infos["depth_anything_v2"].resolution.default == 518 and infos["depth_anything_v2"].resolution.min == depth.PATCH
    assert infos["hed"].resolution.default == 512 and infos["invert"].resolution is None
    for info in infos.values():
        if info.resolution is not None:
            assert info.resolution.max == registry.MAX_RESOLUTION and info.resolution.min <= info.resolution.default


class _Counting(base.Annotator):
    name = "counting"

    def __init__(self):
        self.calls = []

    def annotate(self, images, scale=1.0):
        self.calls.append(images.shape[0])
        return images * scale


def test_one_loop_chunks_reports_progress_and_prepares_each_chunk():
    det, done = _Counting(), []
    x = torch.rand(5, 3, 8, 8)
    out = det(x, chunk_size=2, progress=done.append, scale=0.5)
    assert det.calls == [2, 2, 1] and done == [2, 2, 1] and torch.equal(out, x * 0.5)
    det.calls.clear()
    maps, extras = det.run(x, chunk_size=4, prepare=lambda part: part[..., :4, :4])
    assert det.calls == [4, 1] and extras is None and torch.equal(maps, x[..., :4, :4])
    det.calls.clear()
    assert det(x).shape == x.shape and det.calls == [5]  # no network: the whole batch in one call, as before
