"""Condition images derived on the fly from training images, with this project's annotators.

Why: most image collections have no condition images. A canny / lineart / depth ControlNet can be trained on plain
images + captions by computing each condition from its target image while loading, exactly as the annotator nodes
compute it at inference time (same code, same parameters), so train and test conditions match.

Why here and not in `controlnet_core.train`: the trainer's dataset takes any callable (images (B, 3, H, W) in [0, 1]
-> conditions (B, C, H, W) in [0, 1], `controlnet_core.train.data.ConditionFn`) and never imports this package;
this package already builds on `controlnet_core`, so the glue between the two lives on this side.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import registry
from ._core import ControlNetError

ConditionFn = Callable[[torch.Tensor], torch.Tensor]  # what controlnet_core.train.data.ConditionFn takes


def annotator_params(key: str) -> list[str]:
    """Parameter names an annotator takes."""
    return [p.name for p in registry.load_all()[key].params]


def annotator_names() -> list[str]:
    """Registry keys of every annotator that imported."""
    return sorted(registry.load_all())


def annotator_condition(key: str, *, device: str | torch.device = "cpu", dirs=None, **params) -> ConditionFn:
    """A condition function from an annotator: `annotator_condition("canny", low_threshold=100, high_threshold=200)`.

    The annotator is built once, with only the weight files its switches in `params` need (a body-only OpenPose
    needs neither the hand nor the face file; weights searched in `dirs`, default: the annotator weight folders);
    each call runs it on a batch. Unknown keys, unknown parameters and missing weights fail here, before training.
    """
    infos = registry.load_all()
    if key not in infos:
        raise ControlNetError(f"unknown annotator '{key}'; known: {', '.join(sorted(infos))}.")
    known = {p.name for p in infos[key].params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ControlNetError(f"annotator '{key}' has no parameter(s) {unknown}; it takes {sorted(known) or 'none'}.")
    annotator = registry.load(key, device=device, dirs=dirs, params=params)

    def condition(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return annotator(images.to(device), **params).float().cpu()

    condition.cache_identity = f"annotator:{key}:{sorted(params.items())}"  # type: ignore[attr-defined]
    condition.__qualname__ = f"annotator_condition[{key}]"
    return condition


__all__ = ["annotator_condition", "annotator_names", "annotator_params"]
