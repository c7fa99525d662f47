"""Qwen-Image ControlNets, independent of any UI host.

`QwenInstantXControlNet` builds the diffusers layout (`QwenImageControlNetModel`: InstantX canny / depth, the union
file for canny / soft edge / depth / pose, and the 68-channel inpainting ControlNet);
`controlnet_core.formats.qwen_keys` detects its files and derives its `QwenControlNetConfig` from tensor shapes.
`controlnet_core.qwen.injection` says which output each base block receives.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ControlNetError
from ..mmdit import append_keep_mask  # the same 17-channel hint (latent + keep mask) as SD3 / Flux inpainting
from .config import BASE_BLOCKS, LATENT_CHANNELS, QWEN_AXES_DIMS, QwenControlNetConfig
from .injection import COMFY_SLOTS, QwenControlOutput, base_block_sources, diffusers_block_sources, host_sources
from .instantx import QwenInstantXControlNet

# The Qwen-Image VAE (Wan 2.1's) per-channel latent statistics: a latent hint is the condition image's latent
# brought to the base model's own latent space, (latent - mean) / std, as ComfyUI's Wan21 latent format and
# diffusers' Qwen-Image pipelines do.
VAE_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def hint_latent_from_vae(latent: torch.Tensor) -> torch.Tensor:
    """The Qwen-Image VAE's raw encoding of a condition image, (B, 16, H, W) or (B, 16, T, H, W) -> the hint a
    Qwen-Image ControlNet takes (before any keep mask is appended)."""
    if latent.ndim not in (4, 5) or latent.shape[1] != LATENT_CHANNELS:
        raise ControlNetError(f"latent has shape {list(latent.shape)}; expected [B, {LATENT_CHANNELS}, H, W] or "
                              f"[B, {LATENT_CHANNELS}, T, H, W] (the Qwen-Image VAE's encoding).")
    view = (1, LATENT_CHANNELS) + (1,) * (latent.ndim - 2)
    mean = torch.tensor(VAE_LATENTS_MEAN, device=latent.device, dtype=latent.dtype).view(view)
    std = torch.tensor(VAE_LATENTS_STD, device=latent.device, dtype=latent.dtype).view(view)
    return (latent - mean) / std


def build_qwen_controlnet(config: QwenControlNetConfig, *, dtype: Optional[torch.dtype] = None,
                          device=None) -> QwenInstantXControlNet:
    """The model of the config, built empty (fill it with `load_state_dict`)."""
    return QwenInstantXControlNet(config, dtype=dtype, device=device)


__all__ = [
    "BASE_BLOCKS", "COMFY_SLOTS", "QWEN_AXES_DIMS", "VAE_LATENTS_MEAN", "VAE_LATENTS_STD", "QwenControlNetConfig",
    "QwenControlOutput", "QwenInstantXControlNet", "append_keep_mask", "base_block_sources", "build_qwen_controlnet",
    "diffusers_block_sources", "hint_latent_from_vae", "host_sources",
]
