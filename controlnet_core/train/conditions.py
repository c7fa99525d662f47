"""Condition images derived on the fly from the training images, with this project's annotators.

Why: most image collections have no condition images. A canny/lineart/depth ControlNet can be trained on
plain images + captions by computing each condition from its target image while loading, exactly as the
annotator nodes would compute it at inference time (same code, same parameters), so train and test
conditions match.

`controlnet_core` stays independent of the `annotators` package: the dataset takes any callable
(images (B, 3, H, W) in [0, 1] -> conditions (B, C, H, W) in [0, 1]); `annotator_condition` builds one
from an annotator's registry key, importing `annotators` only then.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

from ..errors import ControlNetError

log = logging.getLogger(__name__)

ConditionFn = Callable[[torch.Tensor], torch.Tensor]


def _registry():
    """The annotator registry: next to this package inside ComfyUI (the repository folder is the package),
    or the top-level `annotators` package when installed with pip / run from the repository root."""
    for name, package in (("...annotators.registry", __package__), ("annotators.registry", None)):
        try:
            return importlib.import_module(name, package)
        except (ImportError, ValueError):  # ValueError/ImportError: no package above controlnet_core
            continue
    raise ControlNetError("the 'annotators' package of ControlNet Suite is not importable; run from the repository root or install it (pip install -e .).")


def annotator_params(key: str) -> list[str]:
    """Parameter names an annotator takes."""
    return [p.name for p in _registry().load_all()[key].params]


def annotator_names() -> list[str]:
    """Registry keys of every annotator that imported."""
    return sorted(_registry().load_all())


def annotator_condition(key: str, *, device: str | torch.device = "cpu", dirs=None, **params) -> ConditionFn:
    """A condition function from an annotator: `annotator_condition("canny", low_threshold=100, high_threshold=200)`.

    The annotator is built once (weights searched in `dirs`, default: the annotator weight folders); each call
    runs it on a batch. Unknown keys, unknown parameters and missing weights fail here, before training starts.
    """
    reg = _registry()
    infos = reg.load_all()
    if key not in infos:
        raise ControlNetError(f"unknown annotator '{key}'; known: {', '.join(sorted(infos))}.")
    known = {p.name for p in infos[key].params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ControlNetError(f"annotator '{key}' has no parameter(s) {unknown}; it takes {sorted(known) or 'none'}.")
    annotator = reg.load(key, device=device, dirs=dirs)

    def condition(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return annotator(images.to(device), **params).float().cpu()

    condition.cache_identity = f"annotator:{key}:{sorted(params.items())}"  # type: ignore[attr-defined]
    condition.__qualname__ = f"annotator_condition[{key}]"
    return condition


__all__ = ["ConditionFn", "annotator_condition", "annotator_names", "annotator_params"]
