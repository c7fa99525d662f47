"""Checkpoint layouts: detection by signature keys, and pure key tables to and from the canonical ldm names."""
from __future__ import annotations

from typing import Iterable

from . import diffusers, ldm, patches, sd3_keys, sd35_keys, t2i

FORMATS = {
    "ldm-v1.0-full": "original ControlNet 1.0 checkpoint (control_model.* plus the whole SD model)",
    "ldm-v1.1": "ControlNet 1.1 layout (control_model.* only)",
    "ldm": "ldm layout without prefix (zero_convs.*, input_hint_block.*, ...)",
    "diff": "diff ControlNet (ldm layout + 'difference' key; weights relative to the base UNet)",
    "control-lora": "Stability control-LoRA ('lora_controlnet' key; low-rank deltas on the base UNet)",
    "diffusers": "diffusers ControlNetModel",
    "t2i-full": "T2I-Adapter (full), original layout",
    "t2i-light": "T2I-Adapter (light), original layout",
    "t2i-full-diffusers": "T2I-Adapter (full), diffusers layout",
    "t2i-light-diffusers": "T2I-Adapter (light), diffusers layout",
    "sd3-diffusers": "SD3 / SD3.5 ControlNet, diffusers layout (InstantX canny / pose / tile, alimama inpainting)",
    "sd35-stability": "Stability SD3.5 Large ControlNet (blur / canny / depth; the patch embedding is the base model's)",
}

_SIGNATURES = {
    "ldm": ldm.SIGNATURE,
    "ldm-v1.1": tuple(ldm.CONTROL_PREFIX + k for k in ldm.SIGNATURE),
    "diffusers": diffusers.SIGNATURE,
    "control-lora": (patches.LORA_MARKER, "input_hint_block.0.weight", "zero_convs.0.0.weight"),
    "t2i-full": t2i.SIGNATURE_FULL,
    "t2i-light": t2i.SIGNATURE_LIGHT,
    "sd3-diffusers": sd3_keys.SIGNATURE,
    "sd35-stability": sd35_keys.SIGNATURE,
}
_SIGNATURE_STEMS = {name: {k.split(".")[0] for k in sig} for name, sig in _SIGNATURES.items()}


def detect_format(keys: Iterable[str]) -> str | None:
    """The format name (a key of `FORMATS`), or None when no signature matches."""
    keys = set(keys)
    if patches.LORA_MARKER in keys:
        return "control-lora"
    if sd3_keys.is_sd3_diffusers(keys):
        return "sd3-diffusers"
    if sd35_keys.is_sd35_stability(keys):
        return "sd35-stability"
    p = ldm.prefix_of(keys)
    if p is not None:
        if patches.DIFF_MARKER in keys:
            return "diff"
        if p:
            return "ldm-v1.0-full" if ldm.is_full_v10(keys) else "ldm-v1.1"
        return "ldm"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    return t2i.detect(keys)


def closest_format(keys: Iterable[str]) -> tuple[str, float]:
    """The known layout sharing the most top-level module names with `keys`, and that share (0..1)."""
    stems = {k.split(".")[0] for k in keys} | {k.split(".")[1] for k in keys if k.count(".") > 1}
    best, score = "ldm", 0.0
    for name, sig in _SIGNATURE_STEMS.items():
        s = len(stems & sig) / len(sig)
        if s > score:
            best, score = name, s
    return best, score
