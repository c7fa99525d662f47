"""Controllability metrics: how closely a condition map re-extracted from a generated image matches the hint.

The metrics of the ControlNet++ evaluation protocol (Li et al., https://arxiv.org/abs/2404.07987, section 4.1),
computed per image so a batch gives one score per image:

- `f1_binary`: F1 of two binary maps (Canny edges), pixel for pixel;
- `ssim`: structural similarity (soft edges, line art), Wang et al. 2004 (https://doi.org/10.1109/TIP.2003.819861);
- `rmse_255`: root mean square error on the 0..255 scale (depth);
- `miou`: mean IoU over the classes present in either map (segmentation);
- `pck`: percentage of correct keypoints (pose), Yang & Ramanan 2013;
- the toy world's IoU lives in `train.toy_metrics` (`controllability`), with its own mask rules.

Each takes batched tensors and returns a per-image score tensor (B,) and, where a pixel-wise comparison exists,
a per-pixel error map (B, H, W) in [0, 1], 0 where the maps agree: what a user looks at to see where control failed.
Pure tensor functions: no annotator, no host.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import ControlNetError


class MetricError(ControlNetError):
    """Inputs a metric cannot compare (shapes that differ, an image smaller than the SSIM window...)."""


def _same_shape(name: str, a: torch.Tensor, b: torch.Tensor, ndim: int = 3) -> None:
    if a.ndim != ndim or a.shape != b.shape:
        raise MetricError(f"{name}: expected two maps of the same shape (batch, height, width); got {tuple(a.shape)} and "
                          f"{tuple(b.shape)}. Resize the generated map to the hint's size first.")


def f1_binary(pred: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image F1 = 2TP / (2TP + FP + FN) of two boolean maps (B, H, W), exact pixel positions.

    Two empty maps score 1 (nothing asked, nothing drawn). Error map: 1 where exactly one map is set (a missed or an
    extra edge pixel). No tolerance band: ControlNet++ compares the binary maps as they are.
    """
    _same_shape("f1_binary", pred, ref)
    p, r = pred.bool().flatten(1), ref.bool().flatten(1)
    tp = (p & r).sum(1).double()
    wrong = (p ^ r).sum(1).double()  # FP + FN
    denom = 2 * tp + wrong
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(denom))
    return f1.float(), (pred.bool() ^ ref.bool()).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D Gaussian of SSIM (11 taps, sigma 1.5: Wang et al.'s window)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image SSIM of two grayscale batches (B, H, W) in [0, data_range], and its error map.

    Wang et al.'s definition: Gaussian window 11x11, sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, population
    (not sample) variances. The score is the mean of the SSIM map over the positions where the window fits (as
    scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`, which crops the
    same border). Error map: (1 - SSIM) / 2 in [0, 1], its border filled from the nearest valid position.
    """
    _same_shape("ssim", x, y)
    h, w = x.shape[-2:]
    if h < window or w < window:
        raise MetricError(f"ssim: maps of {w}x{h} pixels are smaller than the {window}x{window} window; score maps of at least "
                          f"{window} pixels a side.")
    g = gaussian_window(window, sigma).to(x.device)
    gx, gy = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, 'valid' (no padding): only where the window fits
        return F.conv2d(F.conv2d(t, gx), gy)

    a, b = x.double()[:, None], y.double()[:, None]
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    score = s.mean((1, 2, 3))
    pad = window // 2
    err = F.pad((1 - s) / 2, (pad, window - 1 - pad, pad, window - 1 - pad), mode="replicate")[:, 0]
    return score.float(), err.clamp(0, 1).float()


def rmse_255(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image RMSE of two (B, H, W) maps in [0, 1], reported on the 0..255 scale (ControlNet++'s depth metric).

    Lower is better (0 = identical). Error map: |x - y| in [0, 1].
    """
    _same_shape("rmse_255", x, y)
    d = x.double() - y.double()
    return (d.pow(2).flatten(1).mean(1).sqrt() * 255.0).float(), d.abs().float()


def miou(pred: torch.Tensor, ref: torch.Tensor, num_classes: int, *, ignore_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean IoU of two class-index maps (B, H, W) with values in 0..num_classes-1 (or `ignore_index`).

    Classes: those present in either map of the image. A class absent from both has no IoU (0/0) and is left out of
    the mean rather than counted as 0 or 1, so an image's score does not depend on how many classes the label set has.
    Pixels whose reference is `ignore_index` (unlabelled) are left out, as mmseg does. An image with no class in
    either map (all ignored) scores 1. Error map: 1 where the classes differ on a counted pixel.
    """
    _same_shape("miou", pred, ref)
    p, r = pred.long(), ref.long()
    valid = torch.ones_like(r, dtype=torch.bool) if ignore_index is None else r != ignore_index
    k = num_classes
    out = []
    for pi, ri, vi in zip(p, r, valid):
        pi, ri = pi[vi], ri[vi]
        if ((pi < 0) | (pi >= k) | (ri < 0) | (ri >= k)).any():
            raise MetricError(f"miou: class indices must lie in 0..{k - 1} (or be ignore_index={ignore_index}); found "
                              f"{int(torch.minimum(pi.min(), ri.min()))}..{int(torch.maximum(pi.max(), ri.max()))}.")
        conf = torch.bincount(pi * k + ri, minlength=k * k).view(k, k).double()  # rows: predicted, columns: reference
        inter = conf.diag()
        union = conf.sum(0) + conf.sum(1) - inter
        present = union > 0
        out.append((inter[present] / union[present]).mean() if present.any() else torch.tensor(1.0, dtype=torch.float64))
    return torch.stack(out).float(), ((p != r) & valid).float()


def pck(pred: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], *, alpha: float = 0.1,
        image_sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Per-image PCK: the share of the reference keypoints that a matched predicted person has within a threshold.

    pred, ref: one tensor per image of shape (people, keypoints, 3): x, y in pixels and a confidence, > 0 = found.
    Threshold: alpha x the longer side of the reference person's box (the box around its found keypoints); a person
    with a single found keypoint has no box and uses the longer side of `image_sizes` (height, width) instead.
    People are matched one to one, greedily, most correct keypoints first. A reference keypoint is a miss if its
    person has no match or the matched point is not found. Extra predicted people cost nothing (PCK counts recall).
    An image with no reference keypoint scores 1 if nothing was predicted either, else 0.
    """
    if len(pred) != len(ref):
        raise MetricError(f"pck: {len(pred)} predicted and {len(ref)} reference keypoint sets; expected one of each per image.")
    scores = []
    for i, (p, r) in enumerate(zip(pred, ref)):
        p, r = p.double().reshape(-1, p.shape[-2], 3) if p.numel() else p.double(), r.double()
        rv = r[..., 2] > 0
        total = int(rv.sum())
        if total == 0:
            has_pred = p.numel() > 0 and bool((p[..., 2] > 0).any())
            scores.append(0.0 if has_pred else 1.0)
            continue
        if p.numel() == 0:
            scores.append(0.0)
            continue
        if p.shape[1] != r.shape[1]:
            raise MetricError(f"pck: image {i}: predicted people have {p.shape[1]} keypoints, reference people {r.shape[1]}; "
                              "compare keypoints of the same layout (OpenPose body: 18).")
        thr = []
        for q in range(r.shape[0]):
            pts = r[q][rv[q], :2]
            side = float((pts.max(0).values - pts.min(0).values).max()) if len(pts) > 1 else 0.0
            if side == 0 and image_sizes is not None:
                side = float(max(image_sizes[i]))
            thr.append(alpha * side)
        dist = (r[:, None, :, :2] - p[None, :, :, :2]).norm(dim=-1)  # (ref people, predicted people, keypoints)
        found = rv[:, None, :] & (p[None, :, :, 2] > 0)
        correct = found & (dist <= torch.tensor(thr, dtype=torch.float64)[:, None, None])
        counts = correct.sum(-1)  # (ref people, predicted people)
        hits, used_r, used_p = 0, set(), set()
        for flat in torch.argsort(counts.flatten(), descending=True, stable=True).tolist():
            q, j = divmod(flat, p.shape[0])
            if q in used_r or j in used_p:
                continue
            used_r.add(q)
            used_p.add(j)
            hits += int(counts[q, j])
        scores.append(hits / total)
    return torch.tensor(scores, dtype=torch.float32)


__all__ = ["MetricError", "f1_binary", "gaussian_window", "miou", "pck", "rmse_255", "ssim"]
