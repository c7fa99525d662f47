"""DiffSynth's blockwise Qwen-Image ControlNets (canny / depth / inpaint), structured like their files: a "model
patch", not a ControlNet of its own transformer.

Why a second interface: an InstantX-style ControlNet computes every residual from the noisy latent in a pass of its own
(`ControlResiduals`). These compute block k's residual from the *base's* image tokens right after its block k, so they
can only run inside the base's forward, one block at a time. `block_residual(k, img, hint_tokens)` is that hook;
the host adapter calls it from the base's per-block patch point, scales it (strength, mode weight, mask) and adds it.

How a block works: RMSNorm(image tokens) + RMSNorm(hint tokens) -> Linear -> GELU -> Linear, the hint tokens being
`img_in` of the packed hint latent (the condition image's Qwen-Image latent, normalised as the base's, plus for
inpainting a keep-mask channel, left as it is).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ControlNetError
from ..flux.layers import pack
from ..precision import compute_dtype_of
from .config import LATENT_CHANNELS, PATCH

_EPS = 1e-6


@dataclass(frozen=True)
class QwenBlockwiseConfig:
    """Sizes read off a DiffSynth file's shapes (`formats.qwen_patch_keys`)."""

    hidden_size: int = 3072  # the base's token width
    num_layers: int = 60  # one control block per base block
    extra_channels: int = 0  # hint channels beyond the 16 latent ones: 1 for inpainting (a keep mask)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ControlNetError(f"impossible QwenBlockwiseConfig: {name} = {value!r} is not a positive integer.")
        if not isinstance(self.extra_channels, int) or self.extra_channels < 0:
            raise ControlNetError(f"impossible QwenBlockwiseConfig: extra_channels = {self.extra_channels!r}.")

    @property
    def hint_channels(self) -> int:
        return LATENT_CHANNELS + self.extra_channels

    def summary(self) -> str:
        extra = f", {self.hint_channels}-channel inpainting hint" if self.extra_channels else ""
        return f"Qwen-Image blockwise ControlNet (DiffSynth): {self.num_layers} blocks of width {self.hidden_size}{extra}"


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, _EPS)


class BlockwiseControlBlock(nn.Module):
    def __init__(self, dim: int, **kw):
        super().__init__()
        self.x_rms = _RMSNorm(dim, **kw)
        self.y_rms = _RMSNorm(dim, **kw)
        self.input_proj = nn.Linear(dim, dim, **kw)
        self.output_proj = nn.Linear(dim, dim, **kw)

    def forward(self, img: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        return self.output_proj(F.gelu(self.input_proj(self.x_rms(img) + self.y_rms(hint))))


class QwenBlockwiseControlNet(nn.Module):
    """`encode_hint(hint_latent)` once per latent size, then `block_residual(k, img, hint_tokens)` after base block k."""

    def __init__(self, config: QwenBlockwiseConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device)
        self.img_in = nn.Linear(config.hint_channels * PATCH * PATCH, config.hidden_size, **kw)
        self.controlnet_blocks = nn.ModuleList([BlockwiseControlBlock(config.hidden_size, **kw) for _ in range(config.num_layers)])

    def encode_hint(self, hint_latent: torch.Tensor) -> torch.Tensor:
        """(B, hint_channels, H, W) latent-size hint (`hint_latent_from_vae`, plus the keep mask for inpainting) ->
        (B, ceil(H/2) * ceil(W/2), hidden) hint tokens."""
        cfg = self.config
        if hint_latent.ndim == 5 and hint_latent.shape[2] == 1:  # a one-frame video latent
            hint_latent = hint_latent[:, :, 0]
        if hint_latent.ndim != 4 or hint_latent.shape[1] != cfg.hint_channels:
            raise ControlNetError(f"the hint has shape {list(hint_latent.shape)}; this {cfg.summary()} takes [B, {cfg.hint_channels}, H, W].")
        return self.img_in(pack(hint_latent.to(compute_dtype_of(self))))

    def block_residual(self, index: int, img: torch.Tensor, hint_tokens: torch.Tensor) -> torch.Tensor:
        """What to add to the base's image tokens `img` (B, T, hidden) after its block `index`; unscaled."""
        if not 0 <= index < self.config.num_layers:
            raise ControlNetError(f"block {index} is outside this {self.config.summary()}; the base has more blocks than the patch.")
        if img.shape[1] != hint_tokens.shape[1] or img.shape[-1] != self.config.hidden_size:
            raise ControlNetError(f"image tokens {list(img.shape)} do not fit the hint tokens {list(hint_tokens.shape)}.")
        return self.controlnet_blocks[index](img, hint_tokens.to(img.dtype))
