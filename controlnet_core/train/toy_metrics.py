"""Controllability in the toy world: IoU between the shape a model drew and the shape its condition outlines.

Why these rules: the score must work with and without prompts (the paper's point is that a ControlNet
reads the condition alone), so the generated image is segmented without knowing which colours were asked for.

- Generated shape: every pixel is labelled with the nearest palette colour (Euclidean distance in RGB,
  colours in [0, 1]); the background colour is the label most frequent on the image's one-pixel border, the
  foreground colour the most frequent other label in the image; the shape is every pixel closer to the
  foreground colour than to the background colour (ties: background). Pixels that mix the two colours (the
  bilinear decoder's edges) thus split at the halfway point, and an image of one colour has an empty shape.
- Condition shape: the outline is every pixel brighter than 0.5 (max over channels); the outside is what a
  4-connected flood fill from the border reaches through non-outline pixels; the shape is everything else
  (the interior and the outline itself).
- IoU = |A and B| / |A or B|; two empty masks score 1.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .toy import COLOURS
from .toy_world import PALETTE


def palette_rgb(names: Sequence[str] = PALETTE) -> torch.Tensor:
    """(K, 3) palette colours in [0, 1]."""
    return torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) / 255.0


def generated_shape_mask(images: torch.Tensor, palette: torch.Tensor | None = None) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (B,H,W) bool: pixels closer to the foreground than to the background colour
    (both estimated from the image, see the module docstring)."""
    pal = palette_rgb() if palette is None else palette
    x = images.float().permute(0, 2, 3, 1).cpu()  # B,H,W,3
    dist = torch.cdist(x.reshape(x.shape[0], -1, 3), pal[None].expand(x.shape[0], -1, -1))  # B,HW,K
    labels = dist.argmin(-1).view(x.shape[:3])
    masks = []
    for lab, d in zip(labels, dist):
        border = torch.cat([lab[0, :], lab[-1, :], lab[:, 0], lab[:, -1]])
        bg = int(torch.bincount(border, minlength=len(pal)).argmax())
        counts = torch.bincount(lab.flatten(), minlength=len(pal))
        counts[bg] = 0
        if counts.sum() == 0:
            masks.append(torch.zeros(lab.shape, dtype=torch.bool))
            continue
        fg = int(counts.argmax())
        masks.append((d[:, fg] < d[:, bg]).view(lab.shape))
    return torch.stack(masks)


def condition_shape_mask(hints: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) outlines in [0,1] -> (B,H,W) bool: the outline and what it encloses (see the module docstring)."""
    import cv2

    out = []
    for h in hints.float().amax(1).cpu().numpy():
        outline = (h > 0.5).astype(np.uint8)
        H, W = outline.shape
        padded = np.zeros((H + 2, W + 2), np.uint8)  # a free ring around the image: the fill starts outside it
        padded[1:-1, 1:-1] = outline
        mask = np.zeros((H + 4, W + 4), np.uint8)
        cv2.floodFill(padded, mask, (0, 0), 2, flags=4)
        out.append(torch.from_numpy(padded[1:-1, 1:-1] != 2))
    return torch.stack(out)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item IoU of two (B,H,W) boolean masks; 1 where both are empty."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def controllability(images: torch.Tensor, hints: torch.Tensor) -> torch.Tensor:
    """Per-item IoU between the generated shape of `images` and the shape outlined by `hints`."""
    return iou(generated_shape_mask(images), condition_shape_mask(hints).to(images.device))


__all__ = ["condition_shape_mask", "controllability", "generated_shape_mask", "iou", "palette_rgb"]
