"""Checkpoint layouts: one `Format` record per layout (detection, loading, saving), in detection order.

Each module here declares the records of its layouts; `REGISTRY` orders them so that a more specific layout is asked
before a more general one (a control-LoRA also has ldm keys, a "diff" file too).
"""
from __future__ import annotations

from typing import Iterable, Optional

from . import diffusers, flux_keys, ldm, patches, qwen_keys, qwen_patch_keys, sd3_keys, sd35_keys, t2i, zimage_keys
from .record import Format

REGISTRY: tuple[Format, ...] = (
    patches.CONTROL_LORA,
    sd3_keys.FORMAT,
    sd35_keys.FORMAT,
    *flux_keys.FORMATS,
    qwen_keys.FORMAT,
    qwen_patch_keys.FORMAT,
    zimage_keys.FORMAT,
    patches.DIFF,
    *ldm.FORMATS,
    diffusers.FORMAT,
    *t2i.FORMATS,
)
_BY_NAME = {f.name: f for f in REGISTRY}
FORMATS = {f.name: f.description for f in REGISTRY}  # name -> description, for messages and `info`


def get_format(name: str) -> Format:
    return _BY_NAME[name]


def find_format(keys: Iterable[str]) -> Optional[Format]:
    """The first record whose detection accepts `keys`, or None."""
    keys = frozenset(keys)
    return next((f for f in REGISTRY if f.detect(keys)), None)


def detect_format(keys: Iterable[str]) -> str | None:
    """The format name (a key of `FORMATS`), or None when no signature matches."""
    found = find_format(keys)
    return found.name if found else None


def closest_format(keys: Iterable[str]) -> tuple[str, float]:
    """The known layout sharing the most top-level module names with `keys`, and that share (0..1)."""
    stems = {k.split(".")[0] for k in keys} | {k.split(".")[1] for k in keys if k.count(".") > 1}
    best, score = "ldm", 0.0
    for f in reversed(REGISTRY):  # general layouts first, so a tie names the general one (ldm, not control-LoRA)
        sig = f.signature_stems()
        if sig and len(stems & sig) / len(sig) > score:
            best, score = f.name, len(stems & sig) / len(sig)
    return best, score
