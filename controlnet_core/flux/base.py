"""What both Flux ControlNet classes share: input checks with messages that say what to pass, and the positions.

Inputs follow ComfyUI's Flux conventions, which are the base model's own:
- `x` is the unpacked noisy latent (B, 16, H, W), packed here into 2x2 tokens (odd sizes padded as the host pads);
- `timesteps` is sigma on 0..1 (x1000 inside), `guidance` the distilled guidance scale (Flux.1 dev: about 3.5);
- `context` the T5 tokens, `y` the CLIP-L pooled vector (None: zeros, as ComfyUI passes when it has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ControlNetError
from .config import PATCH, FluxControlNetConfig
from .layers import Rope, position_ids, rope_tables

PIXELS_PER_LATENT = 8  # the Flux VAE's downscale: image hints are 8x the latent's size


@dataclass
class PreparedInputs:
    """Checked inputs, brought to the batch size B: hint expanded, timesteps and guidance as (B,) vectors."""

    hint: torch.Tensor
    timesteps: torch.Tensor
    y: torch.Tensor
    guidance: Optional[torch.Tensor]
    rows: int  # image tokens per column: ceil(H / 2)
    cols: int  # image tokens per row: ceil(W / 2)


def _per_sample(value, b: int, name: str, device, dtype=None) -> torch.Tensor:
    v = torch.as_tensor(value, device=device, dtype=dtype)
    if v.numel() == 1:
        return v.reshape(1).expand(b)
    if v.shape != (b,):
        raise ControlNetError(f"{name} has shape {list(v.shape)}; expected [{b}] or a single value.")
    return v


class FluxControlNetBase(nn.Module):
    """Input handling shared by `FluxInstantXControlNet` and `FluxXLabsControlNet`."""

    config: FluxControlNetConfig

    def _hint_message(self) -> str:
        cfg = self.config
        if cfg.pixel_hint:
            return "The hint is the condition image itself (values 0..1), at 8x the latent's size."
        if cfg.extra_conditioning_channels:
            return ("An inpainting ControlNet takes the masked image's latent and a keep mask: see "
                    "controlnet_core.flux.append_keep_mask.")
        return "The hint is the VAE-encoded condition image (see controlnet_core.flux.hint_latent_from_vae), not the image."

    def prepare(self, x: torch.Tensor, hint: torch.Tensor, timesteps, context: torch.Tensor,
                y: Optional[torch.Tensor], guidance) -> PreparedInputs:
        """Check every input against the config; raise `ControlNetError` naming the first that does not fit."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.latent_channels:
            raise ControlNetError(f"x has shape {list(x.shape)}; expected [B, {cfg.latent_channels}, H, W] (a Flux latent).")
        b, _, h, w = x.shape
        if cfg.pixel_hint:
            channels, size, what = 3, (h * PIXELS_PER_LATENT, w * PIXELS_PER_LATENT), "8x the latent's size"
        else:
            channels, size, what = cfg.hint_latent_channels, (h, w), "the latent's size"
        if hint.ndim != 4 or hint.shape[1] != channels:
            raise ControlNetError(f"hint has shape {list(hint.shape)}; expected [{b}, {channels}, {size[0]}, {size[1]}]. "
                                  + self._hint_message())
        if tuple(hint.shape[-2:]) != size or hint.shape[0] not in (1, b):
            raise ControlNetError(f"hint has shape {list(hint.shape)}; expected [{b} or 1, {channels}, {size[0]}, {size[1]}] "
                                  f"({what}: resize the condition image to the output size first).")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
            raise ControlNetError(f"context has shape {list(context.shape)}; expected [{b}, tokens, {cfg.joint_attention_dim}] "
                                  "(T5 text tokens).")
        if y is None:
            y = torch.zeros(b, cfg.pooled_projection_dim, dtype=x.dtype, device=x.device)
        elif y.shape != (b, cfg.pooled_projection_dim):
            raise ControlNetError(f"y has shape {list(y.shape)}; expected [{b}, {cfg.pooled_projection_dim}] (the pooled CLIP-L vector).")
        if cfg.guidance_embeds:
            if guidance is None:
                raise ControlNetError("this ControlNet embeds the guidance scale (a Flux.1 dev one): pass guidance, "
                                      "the same value the base model gets (usually 3.5).")
            guidance = _per_sample(guidance, b, "guidance", x.device, torch.float32)
        else:
            guidance = None  # ignored, as ComfyUI ignores it for models without a guidance embedding
        return PreparedInputs(
            hint=hint.expand(b, -1, -1, -1), timesteps=_per_sample(timesteps, b, "timesteps", x.device), y=y,
            guidance=guidance, rows=-(-h // PATCH), cols=-(-w // PATCH))

    def rope(self, text_tokens: int, rows: int, cols: int, device) -> Rope:
        """cos / sin tables for [text tokens, image tokens] (`layers.rope_tables`)."""
        ids = position_ids(text_tokens, rows, cols, device=device)
        return rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)
