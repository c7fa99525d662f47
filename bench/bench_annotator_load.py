"""What a repeated `registry.load` costs once the annotator is built: OpenPose with its three full-size files (body,
hand, face: 510 MB, random weights whose SHA-256 is pinned in the manifest for the run, so the hash check runs as it
does for the published files). Every annotator node run calls `registry.load` first.

    .venv/bin/python bench/bench_annotator_load.py [--reps 5]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from common import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from annotators import openpose as op
    from annotators import registry, weights

    with tempfile.TemporaryDirectory() as d:
        total = 0
        for cls, name in ((op.BodyPoseNet, op.BODY_FILE), (op.HandPoseNet, op.HAND_FILE), (op.FaceNet, op.FACE_FILE)):
            path = Path(d) / name
            torch.save(cls().state_dict(), path)
            weights.MANIFEST[name] = dataclasses.replace(weights.MANIFEST[name], sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                                         size=path.stat().st_size)
            total += path.stat().st_size
        t0 = time.perf_counter()
        det = registry.load("openpose", dirs=[d])
        first = time.perf_counter() - t0
        again = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            assert registry.load("openpose", dirs=[d]) is det
            again.append(time.perf_counter() - t0)
    print(f"# registry.load('openpose'), 3 files {total / 1e6:.0f} MB; {date.today()}, {machine()}")
    print(f"first load (read, verify, build) {first * 1000:.0f} ms; each later load: median {statistics.median(again) * 1000:.3f} ms "
          f"(min {min(again) * 1000:.3f}, max {max(again) * 1000:.3f}) over {args.reps}")


if __name__ == "__main__":
    main()
