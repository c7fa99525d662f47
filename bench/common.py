"""Shared helpers for the benchmarks: the random-weight factories of the tests, the host, timing, memory."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def proc_status_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) resident memory, as the kernel accounts it, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} x{os.cpu_count()}, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def timed(fn, sync=None) -> float:
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def alternate(fns: dict, reps: int, sync=None, stat=statistics.median) -> dict[str, float]:
    """Seconds per call (median by default), runs interleaved so drift hits every contender alike (one warm-up each)."""
    for f in fns.values():
        timed(f, sync)
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            samples[k].append(timed(f, sync))
    if os.environ.get("BENCH_VERBOSE"):
        for k, v in samples.items():
            print(f"  {k}: " + " ".join(f"{x * 1000:.0f}" for x in v), file=sys.stderr)
    return {k: stat(v) for k, v in samples.items()}
