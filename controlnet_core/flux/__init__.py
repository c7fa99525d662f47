"""Flux.1 ControlNets, independent of any UI host.

`FluxInstantXControlNet` builds the diffusers layout (InstantX, Shakker-Labs union / Union Pro 2.0, alimama
inpainting), `FluxXLabsControlNet` the BFL-named XLabs and MistoLine layouts; `controlnet_core.formats.flux_keys`
detects their files and derives their `FluxControlNetConfig` from tensor shapes. `controlnet_core.flux.injection`
says which output each base block receives.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..mmdit import append_keep_mask  # the same 17-channel hint (latent + keep mask) as SD3 inpainting
from .config import BASE_DOUBLE_BLOCKS, BASE_SINGLE_BLOCKS, LAYOUTS, FluxControlNetConfig
from .injection import (
    COMFY_DOUBLE_SLOTS,
    COMFY_SINGLE_SLOTS,
    FluxControlOutput,
    base_block_sources,
    diffusers_block_sources,
    flux_base_sources,
    host_sources,
)
from .instantx import FluxInstantXControlNet
from .xlabs import FluxXLabsControlNet

# The Flux VAE's latent shift and scale: a latent hint is the condition image's latent brought to the base model's
# own latent space, (latent - shift) * scale, as ComfyUI's Flux latent format and diffusers' pipelines do.
VAE_SHIFT_FACTOR = 0.1159
VAE_SCALING_FACTOR = 0.3611


def hint_latent_from_vae(latent: torch.Tensor) -> torch.Tensor:
    """The Flux VAE's raw encoding of a condition image -> the hint a latent-hint Flux ControlNet takes."""
    return (latent - VAE_SHIFT_FACTOR) * VAE_SCALING_FACTOR


def build_flux_controlnet(config: FluxControlNetConfig, *, dtype: Optional[torch.dtype] = None,
                          device=None) -> Union[FluxInstantXControlNet, FluxXLabsControlNet]:
    """The model class of the config's layout, built empty (fill it with `load_state_dict`)."""
    cls = FluxInstantXControlNet if config.layout == "instantx" else FluxXLabsControlNet
    return cls(config, dtype=dtype, device=device)


__all__ = [
    "BASE_DOUBLE_BLOCKS", "BASE_SINGLE_BLOCKS", "COMFY_DOUBLE_SLOTS", "COMFY_SINGLE_SLOTS", "LAYOUTS", "VAE_SHIFT_FACTOR",
    "VAE_SCALING_FACTOR", "FluxControlNetConfig", "FluxControlOutput", "FluxInstantXControlNet", "FluxXLabsControlNet",
    "append_keep_mask", "base_block_sources", "build_flux_controlnet", "diffusers_block_sources", "flux_base_sources",
    "hint_latent_from_vae", "host_sources",
]
