"""Keep large freed blocks in the C heap while an annotator runs on a CPU (Linux with glibc only).

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it to
the system on free, so each such tensor is page-faulted in 4 KiB at a time on every use. A 512 px HED pass makes
dozens of 32-64 MiB activations, which cost ~53k page faults per image; line art ~130k. Inside `reuse_large_blocks`
the threshold is raised, so those blocks come from the heap and are reused from image to image (6-13% faster here,
bench/RESULTS.md). On leaving, the thresholds are set back to glibc's steady-state values (32 MiB mmap, 64 MiB trim)
and `malloc_trim(0)` hands the freed memory back to the system, so the rest of the ComfyUI process keeps its usual
memory behaviour. Elsewhere (macOS, Windows, musl) this does nothing. Opt out with CNS_HEAP_REUSE=0.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from typing import Iterator, Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
INSIDE_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap while an annotator runs
INSIDE_TRIM_THRESHOLD = (1 << 31) - 1  # the largest int mallopt takes
AFTER_MMAP_THRESHOLD = 32 << 20  # glibc's dynamic threshold settles here (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
AFTER_TRIM_THRESHOLD = 64 << 20  # ... and the trim threshold at twice that

_lock = threading.Lock()
_depth = 0
_libc: Optional[ctypes.CDLL] = None
_probed = False


def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (it has mallopt and malloc_trim), else None."""
    global _libc, _probed
    if not _probed:
        _probed = True
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(None)  # the symbols already loaded in this process, the C library's among them
                if hasattr(lib, "gnu_get_libc_version") and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim"):
                    lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                    lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                    _libc = lib
            except OSError as e:  # no C library to load: nothing to tune
                log.debug("heap tuning unavailable: %s", e)
    return _libc


def enabled() -> bool:
    return os.environ.get("CNS_HEAP_REUSE", "1") != "0" and glibc() is not None


@contextlib.contextmanager
def reuse_large_blocks() -> Iterator[None]:
    """Within: large blocks are served from and returned to the heap. Nested uses share the outermost scope."""
    global _depth
    if not enabled():
        yield
        return
    libc = glibc()
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_THRESHOLD, INSIDE_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, INSIDE_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
                libc.malloc_trim(0)
