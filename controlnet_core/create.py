"""Create a ControlNet from a base UNet: the paper's "trainable copy" with zero convolutions.

The encoder and middle block are copied from the UNet; the zero convs, `middle_block_out` and the
last hint conv are zero, so every residual is exactly 0 and the base model's output is unchanged
until training moves them (paper section 3.1, "zero convolution").
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .config import config_from_unet_like_state_dict
from .errors import CheckpointError, ControlNetError
from .formats import patches
from .loader import StateDictLike, as_source
from .model import ControlNet

log = logging.getLogger(__name__)

_COPIED = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def create_from_unet(
    unet: StateDictLike,
    *,
    hint_channels: int = 3,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    num_heads: Optional[int] = None,
    num_head_channels: Optional[int] = None,
    seed: Optional[int] = None,
) -> ControlNet:
    """A ControlNet whose residuals are all exactly zero, initialised from `unet` (ldm keys, bare or in a checkpoint)."""
    if isinstance(hint_channels, bool) or not isinstance(hint_channels, int) or hint_channels < 1:
        raise ControlNetError(f"hint_channels = {hint_channels!r}: a ControlNet needs at least one hint channel (an RGB hint has 3).")
    base = as_source(unet, "base UNet")
    prefix = patches.unet_prefix(base)
    shapes = {k[len(prefix):]: torch.empty(base.shape(k), device="meta") for k in base.keys() if k.startswith(prefix)}
    config = config_from_unet_like_state_dict(shapes, hint_channels=hint_channels, num_heads=num_heads, num_head_channels=num_head_channels, source=base.name)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ControlNet(config, dtype=dtype, device=device)
    copied = 0
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.startswith(_COPIED):
                key = prefix + name
                if key not in base:
                    raise CheckpointError(f"{base.name}: the UNet has no '{key}', which the ControlNet copy needs.")
                p.copy_(base.get(key, dtype))
                copied += 1
    for zc in model.zero_convs:
        zero_module(zc)
    zero_module(model.middle_block_out)
    zero_module(model.input_hint_block[-1])
    log.info("created a ControlNet (%s) from %s: %d tensors copied, zero convs zeroed", config.family(), base.name, copied)
    return model.eval()
