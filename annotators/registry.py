"""The annotator registry: one entry per annotator, from which the ComfyUI nodes are generated.

A module adds its annotators with `register(AnnotatorInfo(...))` at import; `load(key)` builds (and caches)
the annotator, finding its weight files through `weights.find`.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .base import Annotator


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "INT" | "FLOAT" | "BOOLEAN" | "COMBO"
    default: Any
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    choices: Sequence[str] = ()
    tooltip: str = ""


@dataclass(frozen=True)
class AnnotatorInfo:
    key: str  # unique id, e.g. "hed"
    title: str  # node display name, e.g. "HED soft edges"
    build: Callable[..., Annotator]  # build(weight_paths: dict[filename, Path], device, dtype) -> Annotator
    params: Sequence[Param] = ()  # keyword arguments of annotate()
    weights: Sequence[str] = ()  # weight file names (see weights.MANIFEST)
    keypoints: bool = False  # annotate() results carry OpenPose-JSON keypoints (see openpose)
    description: str = ""
    licence: str = ""


ANNOTATORS: dict[str, AnnotatorInfo] = {}
MODULES = ("classical", "hed", "pidinet", "mlsd", "lineart", "openpose", "depth", "segmentation")
_cache: dict = {}
log = logging.getLogger(__name__)
_lock = threading.Lock()


def register(info: AnnotatorInfo) -> AnnotatorInfo:
    ANNOTATORS[info.key] = info
    return info


FAILED: dict[str, str] = {}  # module -> why it could not be imported


def load_all() -> dict[str, AnnotatorInfo]:
    """Import every annotator module once. One broken module (a missing optional dependency, say) must not
    take the other annotators down with it: its error is logged and kept in FAILED."""
    for m in MODULES:
        if m in FAILED:
            continue
        try:
            importlib.import_module(f".{m}", __package__)
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            if isinstance(e, ModuleNotFoundError) and e.name == f"{__package__}.{m}":
                FAILED[m] = "not installed"
                continue
            FAILED[m] = f"{type(e).__name__}: {e}"
            log.warning("annotator module '%s' failed to import and is unavailable: %s", m, FAILED[m])
    return ANNOTATORS


def load(key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, dirs=None) -> Annotator:
    """Build an annotator once per (key, device, dtype, files) and keep it."""
    from . import weights

    info = load_all()[key]
    paths = {f: weights.find(f, dirs) for f in info.weights}
    ck = (key, str(device), dtype, tuple(sorted((f, str(p)) for f, p in paths.items())))
    with _lock:
        if ck not in _cache:
            _cache[ck] = info.build(paths, device=torch.device(device), dtype=dtype)
        return _cache[ck]
