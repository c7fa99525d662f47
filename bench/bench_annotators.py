"""Per-image annotator time on a 512x512 batch of 8: ours vs controlnet-aux on the same random weights and images,
and our Canny vs raw OpenCV. Ratios are printed as peer time / our time (higher = we are faster).

    .venv/bin/python bench/bench_annotators.py [--reps 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import machine

N, SIZE = 8, 512


def best(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def images():
    rng = np.random.default_rng(0)
    imgs = [cv2.GaussianBlur(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), (0, 0), 3) for _ in range(N)]
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    return imgs, batch


def bench_canny(reps: int) -> tuple[float, float]:
    from annotators import registry

    imgs, batch = images()
    ours = registry.load("canny")
    t_ours = best(lambda: ours(batch, resolution=SIZE, low_threshold=100, high_threshold=200), reps)
    t_cv = best(lambda: [cv2.Canny(i, 100, 200) for i in imgs], reps)
    return t_ours, t_cv


NEURAL = {}  # key -> callable(tmpdir, imgs, batch, reps) -> (ours_s, theirs_s); filled by the sections below


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# annotators, {N} images {SIZE}x{SIZE}, per-image ms (best of {args.reps}); {machine()}")
    t_ours, t_cv = bench_canny(args.reps)
    print(f"canny        ours {t_ours / N * 1000:8.2f}  raw OpenCV {t_cv / N * 1000:8.2f}  ours/OpenCV {t_ours / t_cv:.2f}x")
    imgs, batch = images()
    with tempfile.TemporaryDirectory() as d:
        for key, fn in NEURAL.items():
            try:
                o, t = fn(Path(d), imgs, batch, args.reps)
            except Exception as e:  # noqa: BLE001 - a missing annotator is reported, the others still run
                print(f"{key:12} skipped: {type(e).__name__}: {e}")
                continue
            print(f"{key:12} ours {o / N * 1000:8.1f}  controlnet-aux {t / N * 1000:8.1f}  speed-up {t / o:.2f}x")


if __name__ == "__main__":
    main()
