"""The ldm UNet building blocks a ControlNet copies, named exactly as the checkpoints name them.

Module attribute names (`in_layers`, `emb_layers`, `transformer_blocks`, `to_q`, ...) are the key
names of the original `cldm`/`ldm` code, so a state dict maps one to one with no renaming.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of shape (B, dim), as in the ldm code (and diffusers' flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, eps: float = 1e-5, **kw) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps, affine=True, **kw)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the timestep embedding, twice; a 1x1 skip when the width changes."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.in_layers = nn.Sequential(group_norm(channels, **kw), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1, **kw))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **kw))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, **kw), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1, **kw)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1, **kw)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int, *, dtype=None, device=None):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: Optional[int], heads: int, dim_head: int, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False, **kw)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, **kw), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim_head)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, **kw):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, **kw):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult, **kw), nn.Dropout(0.0), nn.Linear(dim * mult, dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: Optional[int], **kw):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, **kw)
        self.ff = FeedForward(dim, **kw)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, **kw)
        self.norm1 = nn.LayerNorm(dim, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.norm3 = nn.LayerNorm(dim, **kw)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image-shaped wrapper around transformer blocks; SD1.x projects with 1x1 convs, SD2.x/SDXL with Linear."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: Optional[int], use_linear: bool, *, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6, **kw)
        self.proj_in = nn.Linear(channels, inner, **kw) if use_linear else nn.Conv2d(channels, inner, 1, **kw)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(inner, heads, dim_head, context_dim, **kw) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels, **kw) if use_linear else nn.Conv2d(inner, channels, 1, **kw)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()  # a strided view here sends convs down a slow path
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands each layer what it consumes: the embedding to ResBlocks, the context to transformers."""

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x
