"""The annotator registry: one entry per annotator, from which the ComfyUI nodes are generated.

A module adds each annotator with one call at import, `register(AnnotatorInfo(...), Published(...), ...)`, which also
puts the weight files it publishes into `weights.MANIFEST`; `load(key)` builds (and caches) the annotator, finding its
weight files through `weights.locate` / `weights.find`. The cache is consulted before any file is hashed (see `load`).
An annotator's `resolution` parameter (`resolution_param`) is the one source of its resolution widget's limits.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from . import weights
from .base import Annotator, NetworkAnnotator


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


# The largest `resolution` a widget accepts. Why not lower: memory is bounded per image by megapixels
# (`base.check_detect_size`, whose limits the user can raise), which an extreme aspect ratio reaches at any resolution;
# a lower widget bound would only refuse saved workflows that the megapixel limit accepts.
MAX_RESOLUTION = 16384


def resolution_param(default: int = 512, *, min: int = 64, step: int = 8, tooltip: str) -> Param:
    """An annotator's `resolution` (short side it detects at): its default, lower bound and step, declared once and
    read by every user of the annotator (the ComfyUI nodes' widgets among them). Step 8 unless the annotator rounds
    to a coarser grid itself (64 for the networks that do): the frontend snaps a typed value to the step."""
    return Param("resolution", "INT", default, min=min, max=MAX_RESOLUTION, step=step, tooltip=tooltip)


@dataclass(frozen=True)
class Published:
    """Where one of an annotator's weight files is published. The licence and the model named in the manifest entry
    are the annotator's own (`register`)."""

    filename: str
    sha256: Optional[str]  # None: not known here; such a file is never auto-downloaded
    size: Optional[int]
    url: Optional[str] = None  # None: lllyasviel/Annotators (weights.ANNOTATORS_REPO + filename)


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
    # file name -> the BOOLEAN param that needs it (OpenPose: hand_pose_model.pth -> include_hand). Such a file is
    # looked up only when a call switches it on, and handed to the built annotator then (`NetworkAnnotator.attach_weights`);
    # the other files are needed by every call.
    switched_weights: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        booleans = {p.name for p in self.params if p.kind == "BOOLEAN"}
        for f, switch in self.switched_weights.items():
            if f not in self.weights or switch not in booleans:
                raise ValueError(f"annotator '{self.key}': switched weight file {f!r} -> {switch!r} must name one of its weight files "
                                 f"{list(self.weights)} and one of its BOOLEAN params {sorted(booleans)}.")

    def weights_for(self, params: Optional[Mapping[str, Any]] = None) -> list[str]:
        """The weight files a call with these annotate() keyword arguments needs; params=None: every file."""
        if params is None:
            return list(self.weights)
        defaults = {p.name: p.default for p in self.params}
        return [f for f in self.weights if f not in self.switched_weights
                or bool(params.get(self.switched_weights[f], defaults[self.switched_weights[f]]))]

    @property
    def resolution(self) -> Optional[Param]:
        """The `resolution` parameter (default and limits of the detect resolution), or None for annotators without one."""
        return next((p for p in self.params if p.name == "resolution"), None)


ANNOTATORS: dict[str, AnnotatorInfo] = {}
MODULES = ("classical", "hed", "pidinet", "mlsd", "lineart", "openpose", "depth", "segmentation")
_cache: dict = {}
log = logging.getLogger(__name__)
_lock = threading.Lock()


def register(info: AnnotatorInfo, *files: Published) -> AnnotatorInfo:
    """Add an annotator to ANNOTATORS, and each weight file it publishes (one of `info.weights`) to weights.MANIFEST,
    with the annotator's licence and key."""
    for f in files:
        if f.filename not in info.weights:
            raise ValueError(f"annotator '{info.key}': published weight file {f.filename!r} is not one of its weight files {list(info.weights)}.")
    weights.register(*(weights.WeightFile(f.filename, f.url or weights.ANNOTATORS_REPO + f.filename, f.sha256, f.size, info.licence, info.key)
                       for f in files))
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


@dataclass
class _Built:
    """A cached annotator and the state of each weight file it holds: path, `weights.file_stamp`, hash checked."""

    annotator: Annotator
    files: dict[str, tuple[Path, tuple, bool]]


def load(key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, dirs=None,
         params: Optional[Mapping[str, Any]] = None) -> Annotator:
    """Build an annotator once per (key, device, dtype, weight files) and keep it.

    The cache comes first: each needed file is located and stat'ed (path, size, times; `weights.file_stamp`), and a
    file that the cached annotator holds in the same state is not read again. Only a file new to the annotator, or
    changed on disk since, is verified against its published SHA-256 (`weights.verify`, itself once per file state);
    a changed file rebuilds the annotator. A file taken under CNS_SKIP_HASH_CHECK=1 is verified once the check is on.

    params: the annotate() keyword arguments of the coming call. With them only the files their switches need are
    looked up (`AnnotatorInfo.weights_for`: a body-only OpenPose call needs neither the hand nor the face file), and a
    switched file first needed later is handed to the cached annotator. None: every file of the annotator.
    """
    info = load_all()[key]
    needed = info.weights_for(params)
    paths = {f: weights.locate(f, dirs) or weights.find(f, dirs) for f in needed}  # find: the missing-file error, or a download
    stamps = {f: weights.file_stamp(p) for f, p in paths.items()}
    always = tuple(sorted((f, str(p)) for f, p in paths.items() if f not in info.switched_weights))
    ck = (key, str(device), dtype, always)
    check = weights.hash_check_wanted()
    with _lock:
        built = _cache.get(ck)
        if built is not None and any(f in built.files and built.files[f][:2] != (paths[f], stamps[f]) for f in needed):
            built = None  # a file moved or changed on disk: verify it again and rebuild from it
        for f in needed:
            held = built.files.get(f) if built is not None else None
            if check and (held is None or not held[2]) and f in weights.MANIFEST:
                weights.verify(paths[f], weights.MANIFEST[f])
        if built is None:
            built = _cache[ck] = _Built(info.build(paths, device=torch.device(device), dtype=dtype), {})
        else:
            new = {f: paths[f] for f in needed if f not in built.files}
            if new:
                _attach(built.annotator, key, new)
        for f in needed:
            built.files[f] = (paths[f], stamps[f], check or built.files.get(f, (None, None, False))[2])
        return built.annotator


def _attach(annotator: Annotator, key: str, paths: dict[str, Path]) -> None:
    if not isinstance(annotator, NetworkAnnotator):
        raise TypeError(f"annotator '{key}' has switched weight files {sorted(paths)} but is not a NetworkAnnotator that can take them.")
    annotator.attach_weights(paths)
