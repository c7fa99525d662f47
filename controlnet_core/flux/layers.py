"""Flux building blocks shared by both key layouts (diffusers names and BFL names): 2x2 token packing, rotary
positions over (index, row, column), joint attention, adaLN modulation, the x1000 timestep embedding and the
pixel-space hint encoders.

Flux (Black Forest Labs 2024) is an MMDiT (Esser et al. 2024, https://arxiv.org/abs/2403.03206) with rotary position
embeddings instead of a learnt grid, RMS-normalised queries and keys, "double" blocks that keep separate image and
text weights and "single" blocks over the concatenated sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..layers import timestep_embedding
from .config import PATCH, TIME_FREQ_DIM

_NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of Flux
Rope = tuple[torch.Tensor, torch.Tensor]  # cos and sin tables (T, head_dim / 2) of `rope_tables`


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without learnt scale or bias."""
    return F.layer_norm(x, x.shape[-1:], eps=_NORM_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, C) scaled and shifted per sample by (B, C) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


def time_embedding(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal [cos | sin] embedding of t x 1000: Flux takes timesteps (sigma) and guidance on a 0..1 scale and
    multiplies both by 1000 before embedding (ComfyUI's `time_factor`, diffusers' `timestep * 1000`)."""
    return timestep_embedding(t.float() * 1000.0, TIME_FREQ_DIM).to(dtype)


# tokens and positions


def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, ceil(H/2) * ceil(W/2), 4C): 2x2 pixels per token, features ordered (channel, row, column).

    Odd sizes are padded circularly first, as ComfyUI pads its Flux input; that ordering is also diffusers'
    `_pack_latents`, so a 17-channel hint (latent + keep mask) packs to the 64 latent features followed by 4 mask ones.
    """
    b, c, h, w = latent.shape
    pad_h, pad_w = (-h) % PATCH, (-w) % PATCH
    if pad_h or pad_w:
        latent = F.pad(latent, (0, pad_w, 0, pad_h), mode="circular")
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH, pw=PATCH)


def position_ids(text_tokens: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """(L + rows*cols, 3) positions: text tokens all at (0, 0, 0), image tokens at (0, row, column)."""
    ids = torch.zeros(text_tokens + rows * cols, 3, device=device)
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    ids[text_tokens:, 1] = r.flatten().float()
    ids[text_tokens:, 2] = c.flatten().float()
    return ids


def rope_tables(ids: torch.Tensor, axes_dims: Sequence[int], theta: int) -> Rope:
    """cos and sin (T, head_dim / 2) for positions `ids` (T, n_axes): each axis rotates its own slice of pairs.

    Angles are computed in float64 and kept in float32 whatever the model's dtype, as both references do."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].to(torch.float64)[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, heads, T, head_dim) by the table's angles, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, heads * head_dim) -> (B, heads, T, head_dim)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotary attention over (B, heads, T, head_dim) queries, keys and values -> (B, T, heads * head_dim)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class ScaleRMSNorm(nn.Module):
    """RMSNorm with a learnt `scale` (BFL's name; diffusers calls it `weight`), computed in float32."""

    def __init__(self, dim: int, **kw):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + _NORM_EPS)
        return y.to(x.dtype) * self.scale.to(x.dtype)


# pixel-space hint encoders: eight (XLabs) or ten (MistoLine) convolutions, three of stride 2, so a condition image at
# 8x the latent size comes out at the latent size with 16 channels; SiLU between them, none after the last.

ConvSpec = tuple[int, int, int, int]  # in channels, out channels, kernel, stride
XLABS_HINT_CONVS: tuple[ConvSpec, ...] = (
    (3, 16, 3, 1), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1))
MISTOLINE_HINT_CONVS: tuple[ConvSpec, ...] = (
    (3, 16, 3, 1), (16, 16, 1, 1), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1), (16, 16, 3, 2), (16, 16, 3, 1), (16, 16, 3, 2),
    (16, 16, 1, 1), (16, 16, 3, 1))


def _conv(spec: ConvSpec, **kw) -> nn.Conv2d:
    cin, cout, k, stride = spec
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, **kw)


def conv_stack(specs: Sequence[ConvSpec], **kw) -> nn.Sequential:
    """Convolutions with a SiLU between each pair: in a Sequential the convolutions sit at the even indices, which is
    how the BFL-layout checkpoints number them (`input_hint_block.0`, `.2`, ...)."""
    layers: list[nn.Module] = []
    for i, spec in enumerate(specs):
        if i:
            layers.append(nn.SiLU())
        layers.append(_conv(spec, **kw))
    return nn.Sequential(*layers)


class ConditioningEmbedding(nn.Module):
    """diffusers' name for the XLabs encoder (`conv_in`, six `blocks`, `conv_out`), as its converted XLabs files store
    it inside a `FluxControlNetModel`. Same operations as `conv_stack(XLABS_HINT_CONVS)` with `out_channels` out."""

    def __init__(self, out_channels: int, **kw):
        super().__init__()
        self.conv_in = _conv(XLABS_HINT_CONVS[0], **kw)
        self.blocks = nn.ModuleList([_conv(s, **kw) for s in XLABS_HINT_CONVS[1:-1]])
        self.conv_out = _conv((16, out_channels, 3, 1), **kw)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)

