"""Formats that store a ControlNet *relative to a base UNet*: "diff" ControlNets and Stability control-LoRAs.

Both are resolved to absolute canonical weights at load time, one tensor at a time, so no second
full copy of either model is ever held.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checkpoint import TensorSource
from ..errors import CheckpointError
from .record import Format, lazy

DIFF_MARKER = "difference"
LORA_MARKER = "lora_controlnet"
UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def unet_prefix(base: TensorSource) -> str:
    """Prefix under which a UNet state dict (bare, or inside a full checkpoint) keeps `input_blocks.0.0.weight`."""
    for p in UNET_PREFIXES:
        if p + "input_blocks.0.0.weight" in base:
            return p
    raise CheckpointError(
        f"{base.name}: no UNet weights found (looked for 'input_blocks.0.0.weight' bare or under 'model.diffusion_model.'). "
        "Pass the base model's UNet state dict or checkpoint."
    )


def _floating(source: TensorSource, key: str, what: str) -> None:
    """Refuse a stored integer or bool tensor before it is converted (it would load as garbage weights); the dtype
    comes from the header where the format has one, so nothing is read for the check."""
    dtype = source.stored_dtype(key)
    if not dtype.is_floating_point:
        raise CheckpointError(
            f"{source.name}: '{key}' is stored as {dtype}, but {what} must be floating point (float16, bfloat16, float32). "
            "The file is damaged or holds no model."
        )


def diff_tensor(stored: torch.Tensor, key: str, base: TensorSource, base_prefix: str, dtype: torch.dtype) -> torch.Tensor:
    """control = stored delta + base, for every weight the UNet also has; zero convs and hint encoder are absolute."""
    bk = base_prefix + key
    if bk not in base:
        return stored.to(dtype)
    _floating(base, bk, "a base model's UNet weights")
    b = base.get(bk)
    if tuple(b.shape) != tuple(stored.shape):
        raise CheckpointError(
            f"diff ControlNet: '{key}' has shape {tuple(stored.shape)} but the base model's is {tuple(b.shape)}; "
            "this diff ControlNet was made for another base model family."
        )
    return stored.to(torch.float32).add_(b.to(torch.float32)).to(dtype)


def lora_tensor(source: TensorSource, key: str, base: TensorSource, base_prefix: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The absolute weight of `key` in a control-LoRA: stored in full, or base + up @ down, or the base's own."""
    if key in source:
        _floating(source, key, "a control-LoRA's weights")
        return source.get(key, dtype)
    module = key.rsplit(".", 1)[0]
    bk = base_prefix + key
    if key.endswith(".weight") and module + ".up" in source and module + ".down" in source:
        if bk not in base:
            raise CheckpointError(f"control-LoRA patches '{key}', which the base model does not have.")
        for part in (module + ".up", module + ".down"):
            _floating(source, part, "a control-LoRA's weights")
        _floating(base, bk, "a base model's UNet weights")
        w = base.get(bk, torch.float32)
        up = source.get(module + ".up", torch.float32)
        down = source.get(module + ".down", torch.float32)
        delta = up.flatten(1) @ down.flatten(1)
        if delta.numel() != w.numel():
            raise CheckpointError(f"control-LoRA: '{module}' up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit the base weight {tuple(w.shape)}.")
        return (w + delta.reshape(w.shape)).to(dtype)
    if bk in base:
        _floating(base, bk, "a base model's UNet weights")
        return base.get(bk, dtype)
    return None


# Read only: both store deltas against the base they were made from, so writing one back needs that very base.
CONTROL_LORA = Format("control-lora", "Stability control-LoRA ('lora_controlnet' key; low-rank deltas on the base UNet)",
                      (LORA_MARKER, "input_hint_block.0.weight", "zero_convs.0.0.weight"), lambda keys: LORA_MARKER in keys,
                      lazy("..unet_load", "load_unet", "control-lora"))
DIFF = Format("diff", "diff ControlNet (ldm layout + 'difference' key; weights relative to the base UNet)", (),
              lambda keys: DIFF_MARKER in keys and ("zero_convs.0.0.weight" in keys or "control_model.zero_convs.0.0.weight" in keys),
              lazy("..unet_load", "load_unet", "diff"))
