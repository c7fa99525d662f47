"""The original ("cldm"/ldm) layout: canonical keys are these names without a prefix.

v1.0 files are a whole `ControlLDM` (`control_model.*` + UNet + VAE + CLIP + DDPM buffers); v1.1
files hold only `control_model.*`; re-saved files often strip the prefix. Only the ControlNet's own
top-level modules are canonical, so everything else in a v1.0 file is never read.
"""
from __future__ import annotations

from typing import Iterable

from .record import Format, lazy, lazy_save

CONTROL_PREFIX = "control_model."
MODULES = ("time_embed.", "label_emb.", "input_hint_block.", "input_blocks.", "zero_convs.", "middle_block.", "middle_block_out.",
           "task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")  # the last four: union ControlNets
SIGNATURE = ("zero_convs.0.0.weight", "input_hint_block.0.weight", "middle_block_out.0.weight")


def prefix_of(keys: set[str]) -> str | None:
    """'control_model.' or '' when the keys are an ldm ControlNet, else None."""
    if CONTROL_PREFIX + "zero_convs.0.0.weight" in keys:
        return CONTROL_PREFIX
    if "zero_convs.0.0.weight" in keys:
        return ""
    return None


def is_full_v10(keys: set[str]) -> bool:
    return any(k.startswith("model.diffusion_model.") for k in keys)


def canonical_map(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """canonical key -> source key, for the ControlNet modules only."""
    out = {}
    for k in keys:
        if k.startswith(prefix):
            c = k[len(prefix):]
            if c.startswith(MODULES):
                out[c.replace(".attn.in_proj.", ".attn.in_proj_")] = k  # ComfyUI's own name for the union attention
    return out


def _prefix_is(wanted) -> "callable":
    return lambda keys: prefix_of(keys) == wanted


FORMATS = (
    Format("ldm-v1.0-full", "original ControlNet 1.0 checkpoint (control_model.* plus the whole SD model)", (),
           lambda keys: prefix_of(keys) == CONTROL_PREFIX and is_full_v10(keys), lazy("..unet_load", "load_unet", "ldm-v1.0-full")),
    Format("ldm-v1.1", "ControlNet 1.1 layout (control_model.* only)", tuple(CONTROL_PREFIX + k for k in SIGNATURE), _prefix_is(CONTROL_PREFIX),
           lazy("..unet_load", "load_unet", "ldm-v1.1"), lazy_save("..export", "save_ldm", prefix=CONTROL_PREFIX)),
    Format("ldm", "ldm layout without prefix (zero_convs.*, input_hint_block.*, ...)", SIGNATURE, _prefix_is(""),
           lazy("..unet_load", "load_unet", "ldm"), lazy_save("..export", "save_ldm", prefix="")),
)
