"""Aspect-ratio bucketing: train on images of many shapes without squashing them to squares.

Why: resizing a 3:2 photo to 512x512 distorts it and cropping it loses a third of it; the model then
learns squashed objects or never sees the edges. Bucketing (NovelAI's recipe, used by most SD trainers)
makes a set of resolutions with sides multiple of 64 (8 latent pixels, so every UNet level divides evenly)
and about the same pixel area (so every batch costs about the same memory and time), puts each image in
the bucket closest to its aspect ratio, and draws every batch from one bucket (a batch must share a shape).

The epoch order is a pure function of (seed, epoch, global batch size): the trainer's saved data position
then resumes in the middle of an epoch exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ControlNetError


@dataclass(frozen=True)
class Buckets:
    """Bucket resolutions of about `resolution`² pixels (within `area_tolerance`), sides multiples of `step`,
    aspect ratio (long side / short side) at most `max_ratio`."""

    resolution: int = 512
    step: int = 64
    max_ratio: float = 2.0
    area_tolerance: float = 0.1

    def __post_init__(self):
        if self.step <= 0 or self.step % 8 or self.resolution < self.step:
            raise ControlNetError(f"Buckets: step must be a positive multiple of 8 and resolution >= step; got step={self.step}, resolution={self.resolution}.")
        if not 0 <= self.area_tolerance < 1:
            raise ControlNetError(f"Buckets: area_tolerance is a fraction of the target area, in [0, 1); got {self.area_tolerance}.")
        if self.max_ratio < 1:
            raise ControlNetError(f"Buckets: max_ratio is long side / short side, at least 1; got {self.max_ratio}.")

    def sizes(self) -> list[tuple[int, int]]:
        """All (height, width) buckets, sorted. For each short side s (a multiple of step, s² <= area), the long
        sides just below and just above area / s (multiples of step) whose area is within the tolerance (at least
        the closer one), in both orientations."""
        area = self.resolution * self.resolution
        out = set()
        s = self.step
        while s * s <= area:
            lo = max(s, math.floor(area / s / self.step) * self.step)
            cands = sorted({lo, lo + self.step}, key=lambda n: abs(s * n - area))
            keep = [n for n in cands if abs(s * n / area - 1) <= self.area_tolerance] or cands[:1]
            for long in keep:
                if long / s <= self.max_ratio:
                    out.add((s, long))
                    out.add((long, s))
            s += self.step
        return sorted(out)

    def nearest(self, height: int, width: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is closest (in log scale) to height/width; ties go to the larger area."""
        if height <= 0 or width <= 0:
            raise ControlNetError(f"Buckets: an image of {width}x{height} pixels has no area.")
        r = math.log(height / width)
        return min(self.sizes(), key=lambda hw: (abs(math.log(hw[0] / hw[1]) - r), -hw[0] * hw[1]))


def fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover (height, width) keeping the aspect ratio, then crop the centre: no distortion."""
    import cv2

    h, w = img.shape[:2]
    k = max(height / h, width / w)
    nh, nw = max(height, round(h * k)), max(width, round(w * k))
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.ascontiguousarray(img[top : top + height, left : left + width])


def assign(sizes: Sequence[tuple[int, int]], buckets: Buckets) -> list[tuple[int, int]]:
    """The bucket of each (height, width)."""
    cache: dict = {}
    return [cache.setdefault(hw, buckets.nearest(*hw)) for hw in sizes]


def epoch_order(bucket_of: Sequence[tuple[int, int]], epoch: int, seed: int, global_batch: int) -> torch.Tensor:
    """Sample indices for one epoch: every consecutive `global_batch` indices come from one bucket.

    Each bucket is shuffled and cut into batches; its last batch is filled up with the bucket's first
    samples of this shuffle (so a small bucket still trains, and every sample appears at least once); then
    the batches are shuffled. Same (seed, epoch, global_batch): same order.
    """
    if global_batch < 1:
        raise ControlNetError(f"global batch size must be >= 1, not {global_batch}.")
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(bucket_of):
        groups.setdefault(b, []).append(i)
    batches: list[list[int]] = []
    for b in sorted(groups):
        idx = groups[b]
        items = [idx[int(j)] for j in torch.randperm(len(idx), generator=g)]
        n = -(-len(items) // global_batch) * global_batch
        items = [items[j % len(items)] for j in range(n)]
        batches += [items[j : j + global_batch] for j in range(0, n, global_batch)]
    order = torch.randperm(len(batches), generator=g)
    return torch.tensor([i for j in order.tolist() for i in batches[j]], dtype=torch.long)


__all__ = ["Buckets", "assign", "epoch_order", "fit"]
