"""What every annotator is: images (B, C, H, W) in [0, 1] in, condition maps (B, C', H, W) in [0, 1] out.

Input is normalised here once, so each annotator can assume a clean RGB float batch:
1 channel -> repeated, RGBA -> composited on black, NaN/inf -> 0, values clamped to [0, 1].
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ._core import ControlNetError


class AnnotatorError(ControlNetError):
    """Bad input to an annotator (empty batch, wrong shape...)."""


def as_rgb(images: torch.Tensor, what: str = "annotator") -> torch.Tensor:
    """Validate and normalise a (B, C, H, W) batch to float RGB in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AnnotatorError(f"{what}: expected an image batch (batch, channels, height, width); got {shape}.")
    if images.shape[0] == 0:
        raise AnnotatorError(f"{what}: the image batch is empty; connect at least one image.")
    if 0 in images.shape[2:]:
        raise AnnotatorError(f"{what}: image of size {tuple(images.shape[2:])} has no pixels.")
    x = images.float()
    c = x.shape[1]
    if c == 4:
        x = x[:, :3] * x[:, 3:4]
    elif c == 2:
        x = (x[:, :1] * x[:, 1:2]).expand(-1, 3, -1, -1)
    elif c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c != 3:
        raise AnnotatorError(f"{what}: images have {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    lo, hi = torch.aminmax(x)  # one pass; NaN makes both comparisons false
    if not (lo >= 0 and hi <= 1):
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return x


def resize_to(images: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    if tuple(images.shape[-2:]) == (height, width):
        return images
    kw = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(images, size=(height, width), mode=mode, **kw)


def detect_size(height: int, width: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Scale so the short side is `resolution`, rounded to `multiple` (as the ControlNet 1.1 annotators do)."""
    k = resolution / min(height, width)
    h = max(multiple, int(round(height * k / multiple)) * multiple)
    w = max(multiple, int(round(width * k / multiple)) * multiple)
    return h, w


def chunks(images: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, images.shape[0], max(1, size)):
        yield images[i : i + size]


class Annotator(abc.ABC):
    """Callable annotator: `__call__(images (B,C,H,W) in [0,1]) -> (B,C',H,W) in [0,1]`, same H, W as the input."""

    name: str = "annotator"

    @abc.abstractmethod
    def annotate(self, images: torch.Tensor, **params) -> torch.Tensor:
        """Clean RGB batch (B, 3, H, W) in [0, 1] -> condition maps (B, C, H, W) in [0, 1], same H and W."""

    def __call__(self, images: torch.Tensor, chunk_size: int = 8, progress: Optional[Callable[[int], None]] = None, **params) -> torch.Tensor:
        x = as_rgb(images, self.name)
        outs = []
        for part in chunks(x, chunk_size):
            outs.append(self.annotate(part, **params))
            if progress is not None:
                progress(part.shape[0])
        return torch.cat(outs, 0)


def gaussian_kernel(sigma: float) -> int:
    return max(3, int(math.ceil(sigma * 3)) * 2 + 1)
