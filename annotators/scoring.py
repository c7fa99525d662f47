"""Controllability scores: re-annotate generated images with the annotator that made the hint, and compare.

The glue between the annotators and the pure metrics of `controlnet_core.metrics` (the ControlNet++ protocol,
https://arxiv.org/abs/2404.07987): each scorer key names the annotator that is run again on the generated images
and the metric its maps are compared with, and says how a map becomes the metric's input (binary edges, grayscale,
ADE20K class indices, OpenPose body keypoints). The generated images are resized to the hint's size before they are
annotated, so every comparison is pixel for pixel at the hint's size.

Why pose needs keypoints: a rendered skeleton cannot be read back into keypoints reliably (limbs overlap, colours blur
when resized), so the hint's keypoints come from the OpenPose node that drew it (its POSE_KEYPOINT output). The
generated image's keypoints are detected again; its error map compares the two skeleton drawings.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from . import registry
from .base import AnnotatorError, as_rgb, resize_to

try:
    from ..controlnet_core import metrics
except ImportError:  # annotators imported as a top-level package
    from controlnet_core import metrics

log = logging.getLogger(__name__)

Annotate = Callable[[str, torch.Tensor, int, dict], tuple[torch.Tensor, Optional[list]]]


@dataclass(frozen=True)
class Scorer:
    key: str  # the choice offered to users
    annotator: Optional[str]  # registry key run again on the generated images; None: the toy world (no annotator)
    metric: str  # "f1" | "ssim" | "rmse" | "miou" | "pck" | "iou"
    higher_is_better: bool
    description: str


_SOFT = "SSIM of the soft maps in grayscale (ControlNet++: HED, line art)"
SCORERS: dict[str, Scorer] = {s.key: s for s in (
    Scorer("canny", "canny", "f1", True, "F1 of the binary edge maps (ControlNet++: Canny)"),
    Scorer("hed", "hed", "ssim", True, _SOFT),
    Scorer("pidinet", "pidinet", "ssim", True, _SOFT),
    Scorer("lineart", "lineart", "ssim", True, _SOFT),
    Scorer("lineart_coarse", "lineart_coarse", "ssim", True, _SOFT),
    Scorer("lineart_standard", "lineart_standard", "ssim", True, _SOFT),
    Scorer("depth_anything_v2", "depth_anything_v2", "rmse", False, "RMSE of the depth maps on 0..255, lower is better (ControlNet++: depth)"),
    Scorer("seg_uniformer", "seg_uniformer", "miou", True, "mean IoU of the ADE20K classes read from the colour maps (ControlNet++: segmentation)"),
    Scorer("openpose", "openpose", "pck", True, "PCK of the OpenPose body keypoints; needs the hint's keypoints"),
    Scorer("toy", None, "iou", True, "the toy world's IoU of the drawn and the outlined shape (controlnet_core.train.toy_metrics)"),
)}

UNLABELLED = 150  # class index of black pixels in a segmentation colour map: the colour of ids outside ADE20K's 150
_PIXELS_PER_BLOCK = 1 << 16  # nearest-colour search: (pixels, 151) distances at a time, about 40 MB in float32


MISSING_KEYPOINTS = ("openpose score: the hint's keypoints are missing. A drawn skeleton cannot be read back into keypoints; "
                     "connect the keypoints output of the OpenPose (Suite) node that made the hint to 'keypoints'.")


class ScoreError(AnnotatorError):
    """Inputs the score cannot be computed from (unknown scorer, batch sizes that differ, missing keypoints...)."""


@dataclass
class ScoreResult:
    scores: torch.Tensor  # (B,) float32, one per generated image
    error_maps: torch.Tensor  # (B, H, W) in [0, 1] at the hint's size, 0 where the maps agree
    scorer: Scorer

    @property
    def mean(self) -> float:
        return float(self.scores.mean())


def available(keys: Optional[Sequence[str]] = None) -> list[str]:
    """The scorer keys whose annotator imported (`registry.load_all`); the toy world needs none."""
    have = registry.load_all()
    return [k for k, s in SCORERS.items() if (s.annotator is None or s.annotator in have) and (keys is None or k in keys)]


# --- map conversions ---------------------------------------------------------------------------------------------


def grayscale(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): the mean over channels (condition maps are gray drawn in 3 equal channels)."""
    return maps.float().mean(1)


def ade20k_classes(colour_maps: torch.Tensor) -> torch.Tensor:
    """ADE20K colour maps (B, 3, H, W) in [0, 1] -> class indices (B, H, W): the nearest palette colour (Euclidean, RGB).

    Black, the colour `segmentation.colorize_ade20k` gives ids outside the 150 classes, is one more entry: UNLABELLED.
    Nearest rather than exact, because a resized or JPEG-saved map no longer holds the palette's exact colours (the
    closest two distinct palette colours are 7.07/255 apart). ADE20K's palette gives classes 6 and 48 the same colour:
    both read as 6, in the hint and in the generated map alike.
    """
    from .segmentation import ade20k_palette

    pal = torch.cat([ade20k_palette().float(), torch.zeros(1, 3)]).to(colour_maps.device) / 255.0  # (151, 3)
    pixels = colour_maps.float().permute(0, 2, 3, 1).reshape(-1, 3)
    out = torch.empty(pixels.shape[0], dtype=torch.long, device=colour_maps.device)
    for i in range(0, pixels.shape[0], _PIXELS_PER_BLOCK):
        out[i : i + _PIXELS_PER_BLOCK] = torch.cdist(pixels[i : i + _PIXELS_PER_BLOCK], pal).argmin(1)
    b, _, h, w = colour_maps.shape
    return out.view(b, h, w)


def body_keypoints(pose: Mapping[str, Any]) -> torch.Tensor:
    """One OpenPose-JSON dict (`openpose.to_openpose_json`: fractions of the canvas) -> (people, 18, 3) body keypoints:
    x, y in pixels of the canvas and the confidence (0: not found)."""
    try:
        w, h = float(pose["canvas_width"]), float(pose["canvas_height"])
        people = [p.get("pose_keypoints_2d") or [] for p in pose.get("people", [])]
    except (KeyError, TypeError, AttributeError) as e:
        raise ScoreError(f"pose keypoints: expected an OpenPose JSON dict with 'people' and 'canvas_width'/'canvas_height' "
                         f"(the keypoints output of the OpenPose (Suite) node); got {type(pose).__name__} ({e}).") from e
    out = torch.zeros(len(people), 18, 3, dtype=torch.float64)
    for i, flat in enumerate(people):
        pts = torch.tensor(flat, dtype=torch.float64).view(-1, 3)[:18]
        out[i, : len(pts)] = pts
    out[..., 0] *= w
    out[..., 1] *= h
    return out


# --- comparing maps ----------------------------------------------------------------------------------------------


def compare(key: str, maps: torch.Tensor, hints: torch.Tensor, *, edge_threshold: float = 0.5, pck_alpha: float = 0.1,
            keypoints: Optional[Sequence[Mapping]] = None, hint_keypoints: Optional[Sequence[Mapping]] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score maps re-annotated from the generated images against the hints: (scores (B,), error maps (B, H, W)).

    maps, hints: (B, 3, H, W) in [0, 1], the same size (for "toy", `maps` are the generated images themselves).
    edge_threshold: Canny maps are binary already; the threshold only undoes resampling blur. pck_alpha: the PCK
    threshold as a share of the reference person's size. keypoints / hint_keypoints: one OpenPose JSON dict per image
    ("openpose" only).
    """
    s = scorer(key)
    if s.metric == "f1":
        return metrics.f1_binary(grayscale(maps) > edge_threshold, grayscale(hints) > edge_threshold)
    if s.metric == "ssim":
        return metrics.ssim(grayscale(maps), grayscale(hints))
    if s.metric == "rmse":
        return metrics.rmse_255(grayscale(maps), grayscale(hints))
    if s.metric == "miou":
        return metrics.miou(ade20k_classes(maps), ade20k_classes(hints), UNLABELLED + 1, ignore_index=UNLABELLED)
    if s.metric == "pck":
        if keypoints is None or hint_keypoints is None:
            raise ScoreError(MISSING_KEYPOINTS)
        h, w = hints.shape[-2:]
        scores = metrics.pck([body_keypoints(k) for k in keypoints], [body_keypoints(k) for k in hint_keypoints],
                             alpha=pck_alpha, image_sizes=[(h, w)] * len(keypoints))
        return scores, (maps.float() - hints.float()).abs().amax(1)
    if s.metric == "iou":
        try:
            from ..controlnet_core.train import toy_metrics
        except ImportError:
            from controlnet_core.train import toy_metrics
        drawn, outlined = toy_metrics.generated_shape_mask(maps), toy_metrics.condition_shape_mask(hints)
        # controllability() is iou(drawn, outlined): its two masks are kept here for the error map
        return toy_metrics.iou(drawn, outlined), (drawn ^ outlined).float()
    raise AssertionError(f"scorer {key!r} has no metric branch for {s.metric!r}")


def scorer(key: str) -> Scorer:
    if key not in SCORERS:
        raise ScoreError(f"controllability score: unknown annotator {key!r}; expected one of {', '.join(SCORERS)}.")
    return SCORERS[key]


def match_batches(images: torch.Tensor, hints: torch.Tensor, what: str = "ControlNet Score") -> torch.Tensor:
    """The hints for each image: one hint is used for every image; otherwise the batch sizes must be equal."""
    b, n = images.shape[0], hints.shape[0]
    if n == b:
        return hints
    if n == 1:
        return hints.expand(b, *hints.shape[1:])
    raise ScoreError(f"{what}: {b} generated images but {n} hints; connect one hint for all images or one hint per image "
                     f"(the same batch size).")


def registry_annotate(annotator: str, images: torch.Tensor, resolution: int, params: dict) -> tuple[torch.Tensor, Optional[list]]:
    """Run a registered annotator on (B, 3, H, W) in [0, 1] without a host (CPU): (maps, keypoints or None)."""
    info = registry.load_all()[annotator]
    if info.resolution is not None:
        params = {**params, "resolution": max(int(resolution), int(info.resolution.min or 1))}
    return registry.load(annotator).run(as_rgb(images, info.title), **params)


def score(key: str, images: torch.Tensor, hints: torch.Tensor, *, annotate: Annotate = registry_annotate,
          annotator_params: Optional[dict] = None, hint_keypoints: Optional[Sequence[Mapping]] = None,
          chunk_size: int = 8, progress: Optional[Callable[[int], None]] = None, **options) -> ScoreResult:
    """Controllability of generated images (B, 3, H', W') against their hints (B or 1, 3, H, W), both in [0, 1].

    1. the hint is broadcast over the batch if there is one; otherwise the batch sizes must match;
    2. the images are resized to the hint's size and annotated once, as a batch (`annotate(annotator, images,
       resolution, params)`: the annotator chunks and reports its own progress; the ComfyUI node passes one that
       hands the network to ComfyUI's memory manager), at a detect resolution of the hint's short side;
    3. maps not exactly at the hint's size (detect sizes are rounded) are resized to it;
    4. maps and hints are compared `chunk_size` images at a time (`compare`; options go to it), progress(n) after each.
    """
    s = scorer(key)
    not_finite = [f"{k} is {v}" for k, v in options.items() if isinstance(v, float) and not math.isfinite(v)]
    if not_finite:  # NaN passes ComfyUI's min/max checks, and would make every edge map empty (a perfect F1)
        raise ScoreError(f"ControlNet Score: {', '.join(not_finite)}; every setting must be a finite number.")
    x = as_rgb(images, "ControlNet Score")
    hint = as_rgb(hints, "ControlNet Score (hint)")
    hint = match_batches(x, hint)
    h, w = hint.shape[-2:]
    x = resize_to(x, h, w)
    keypoints = None
    if s.annotator is not None:
        if s.metric == "pck" and hint_keypoints is None:  # said before the network runs
            raise ScoreError(MISSING_KEYPOINTS)
        maps, keypoints = annotate(s.annotator, x, min(h, w), dict(annotator_params or {}))
        maps = as_rgb(maps, f"{s.annotator} maps")
        if tuple(maps.shape[-2:]) != (h, w):
            maps = resize_to(maps, h, w, "nearest" if s.metric in ("f1", "miou") else "bilinear")
    else:
        maps = x
    if hint_keypoints is not None:
        hint_keypoints = list(hint_keypoints)
        if len(hint_keypoints) == 1:
            hint_keypoints = hint_keypoints * x.shape[0]
        if len(hint_keypoints) != x.shape[0]:
            raise ScoreError(f"ControlNet Score: {x.shape[0]} generated images but keypoints for {len(hint_keypoints)} hints; "
                             "connect the keypoints of one hint or of one hint per image.")
    scores, errors = [], []
    for i in range(0, x.shape[0], max(1, chunk_size)):
        sl = slice(i, i + max(1, chunk_size))
        sc, err = compare(key, maps[sl], hint[sl], keypoints=keypoints[sl] if keypoints is not None else None,
                          hint_keypoints=hint_keypoints[sl] if hint_keypoints is not None else None, **options)
        scores.append(sc.float().cpu())
        errors.append(err.float().cpu())
        if progress is not None:
            progress(sc.shape[0])
    result = ScoreResult(torch.cat(scores), torch.cat(errors), s)
    log.debug("score %s over %d images: mean %.4f", key, x.shape[0], result.mean)
    return result


__all__ = ["SCORERS", "ScoreError", "ScoreResult", "Scorer", "ade20k_classes", "available", "body_keypoints", "compare",
           "grayscale", "match_batches", "registry_annotate", "score", "scorer"]
