"""Flux transformer blocks under diffusers' parameter names (`transformer_blocks.N.attn.to_q`, `norm1.linear`, ...),
the names of InstantX-layout ControlNet files, so their keys map one to one onto parameters.

Same operations as `blocks_bfl`, which holds the BFL-named twins (fused qkv projections) of the XLabs layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..mmdit.layers import AdaLayerNormZero, FeedForward, RMSNorm
from .config import TIME_FREQ_DIM
from .layers import Rope, attention, heads, layer_norm, modulate, time_embedding


class _MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection names)."""

    def __init__(self, in_dim: int, out_dim: int, **kw):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, **kw)
        self.linear_2 = nn.Linear(out_dim, out_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """Timestep, optional guidance scale and pooled text -> the (B, hidden) vector that modulates every block."""

    def __init__(self, hidden_size: int, pooled_projection_dim: int, guidance: bool, **kw):
        super().__init__()
        self.timestep_embedder = _MLP(TIME_FREQ_DIM, hidden_size, **kw)
        self.guidance_embedder = _MLP(TIME_FREQ_DIM, hidden_size, **kw) if guidance else None
        self.text_embedder = _MLP(pooled_projection_dim, hidden_size, **kw)

    def forward(self, timesteps: torch.Tensor, guidance: Optional[torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(time_embedding(timesteps, pooled.dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(time_embedding(guidance, pooled.dtype))
        return emb + self.text_embedder(pooled)


class FluxAttention(nn.Module):
    """Queries, keys and values per stream, each normalised per head; `joint=True` adds the text stream's projections
    and both output layers (double blocks), `joint=False` is the single blocks' projection-only attention."""

    def __init__(self, hidden_size: int, head_dim: int, *, joint: bool, **kw):
        super().__init__()
        self.head_dim = head_dim
        self.to_q = nn.Linear(hidden_size, hidden_size, **kw)
        self.to_k = nn.Linear(hidden_size, hidden_size, **kw)
        self.to_v = nn.Linear(hidden_size, hidden_size, **kw)
        self.norm_q = RMSNorm(head_dim, **kw)
        self.norm_k = RMSNorm(head_dim, **kw)
        if joint:
            self.add_q_proj = nn.Linear(hidden_size, hidden_size, **kw)
            self.add_k_proj = nn.Linear(hidden_size, hidden_size, **kw)
            self.add_v_proj = nn.Linear(hidden_size, hidden_size, **kw)
            self.norm_added_q = RMSNorm(head_dim, **kw)
            self.norm_added_k = RMSNorm(head_dim, **kw)
            self.to_out = nn.ModuleList([nn.Linear(hidden_size, hidden_size, **kw)])  # to_out.1 is the reference's dropout
            self.to_add_out = nn.Linear(hidden_size, hidden_size, **kw)

    def qkv(self, x: torch.Tensor, text: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised (B, heads, T, head_dim) queries and keys, and values, of one stream."""
        if text:
            q, k, v, nq, nk = self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
        else:
            q, k, v, nq, nk = self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k
        return nq(heads(q(x), self.head_dim)), nk(heads(k(x), self.head_dim)), heads(v(x), self.head_dim)


class DoubleBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden_dim: int, **kw):
        super().__init__()
        self.norm1 = AdaLayerNormZero(hidden_size, 6, **kw)
        self.norm1_context = AdaLayerNormZero(hidden_size, 6, **kw)
        self.attn = FluxAttention(hidden_size, head_dim, joint=True, **kw)
        self.ff = FeedForward(hidden_size, mlp_hidden_dim, **kw)
        self.ff_context = FeedForward(hidden_size, mlp_hidden_dim, **kw)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, emb: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, T, C), txt (B, L, C), emb (B, C) -> (img, txt)."""
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(emb)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(emb)
        q, k, v = self.attn.qkv(modulate(layer_norm(img), shift, scale))
        cq, ck, cv = self.attn.qkv(modulate(layer_norm(txt), c_shift, c_scale), text=True)
        out = attention(torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2), rope)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]

        img = img + gate[:, None] * self.attn.to_out[0](img_out)
        img = img + gate2[:, None] * self.ff(modulate(layer_norm(img), shift2, scale2))
        txt = txt + c_gate[:, None] * self.attn.to_add_out(txt_out)
        txt = txt + c_gate2[:, None] * self.ff_context(modulate(layer_norm(txt), c_shift2, c_scale2))
        return img, txt


class SingleBlock(nn.Module):
    """One stream over [text, image] tokens: attention and a feed-forward side by side, summed by one projection."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden_dim: int, **kw):
        super().__init__()
        self.norm = AdaLayerNormZero(hidden_size, 3, **kw)
        self.proj_mlp = nn.Linear(hidden_size, mlp_hidden_dim, **kw)
        self.proj_out = nn.Linear(hidden_size + mlp_hidden_dim, hidden_size, **kw)
        self.attn = FluxAttention(hidden_size, head_dim, joint=False, **kw)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, rope: Rope) -> torch.Tensor:
        shift, scale, gate = self.norm(emb)
        normed = modulate(layer_norm(x), shift, scale)
        attn = attention(*self.attn.qkv(normed), rope)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        return x + gate[:, None] * self.proj_out(torch.cat([attn, mlp], dim=2))
