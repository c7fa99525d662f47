"""Flux transformer blocks under Black Forest Labs' parameter names (`double_blocks.N.img_attn.qkv`, `img_mod.lin`,
`single_blocks.N.linear1`, ...), the names of XLabs and MistoLine ControlNet files.

BFL fuses projections that diffusers keeps apart: `qkv` is [queries | keys | values] along the output features, and
a single block's `linear1` is [queries | keys | values | feed-forward input]. The operations are those of
`blocks_diffusers`, in the same order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Rope, ScaleRMSNorm, attention, heads, layer_norm, modulate, time_embedding


class MLPEmbedder(nn.Module):
    """in_layer -> SiLU -> out_layer (`time_in`, `guidance_in`, `vector_in`)."""

    def __init__(self, in_dim: int, hidden_dim: int, **kw):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, **kw)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


def time_vector(time_in: MLPEmbedder, guidance_in: Optional[MLPEmbedder], vector_in: MLPEmbedder, timesteps: torch.Tensor,
                guidance: Optional[torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
    """The (B, hidden) modulation vector: timestep + guidance scale (dev models) + pooled text."""
    vec = time_in(time_embedding(timesteps, pooled.dtype))
    if guidance_in is not None:
        vec = vec + guidance_in(time_embedding(guidance, pooled.dtype))
    return vec + vector_in(pooled)


class Modulation(nn.Module):
    """`lin(silu(vec))` cut into shift, scale, gate vectors: two triples for double blocks, one for single ones."""

    def __init__(self, hidden_size: int, chunks: int, **kw):
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(hidden_size, chunks * hidden_size, **kw)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec)).chunk(self.chunks, dim=1)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int, **kw):
        super().__init__()
        self.query_norm = ScaleRMSNorm(head_dim, **kw)
        self.key_norm = ScaleRMSNorm(head_dim, **kw)


class SelfAttention(nn.Module):
    """One stream's fused qkv projection, per-head query/key norms and output projection."""

    def __init__(self, hidden_size: int, head_dim: int, qkv_bias: bool, **kw):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias, **kw)
        self.norm = QKNorm(head_dim, **kw)
        self.proj = nn.Linear(hidden_size, hidden_size, **kw)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (heads(t, self.head_dim) for t in self.qkv(x).chunk(3, dim=-1))
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _mlp(hidden_size: int, mlp_hidden_dim: int, **kw) -> nn.Sequential:
    # slot 1 is the GELU, so the layers are `img_mlp.0` and `img_mlp.2` as in the checkpoints
    return nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, **kw), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden_dim, hidden_size, **kw))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden_dim: int, qkv_bias: bool = True, **kw):
        super().__init__()
        self.img_mod = Modulation(hidden_size, 6, **kw)
        self.img_attn = SelfAttention(hidden_size, head_dim, qkv_bias, **kw)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim, **kw)
        self.txt_mod = Modulation(hidden_size, 6, **kw)
        self.txt_attn = SelfAttention(hidden_size, head_dim, qkv_bias, **kw)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim, **kw)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, T, C), txt (B, L, C), vec (B, C) -> (img, txt)."""
        shift, scale, gate, shift2, scale2, gate2 = self.img_mod(vec)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.txt_mod(vec)
        q, k, v = self.img_attn.split(modulate(layer_norm(img), shift, scale))
        cq, ck, cv = self.txt_attn.split(modulate(layer_norm(txt), c_shift, c_scale))
        out = attention(torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2), rope)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]

        img = img + gate[:, None] * self.img_attn.proj(img_out)
        img = img + gate2[:, None] * self.img_mlp(modulate(layer_norm(img), shift2, scale2))
        txt = txt + c_gate[:, None] * self.txt_attn.proj(txt_out)
        txt = txt + c_gate2[:, None] * self.txt_mlp(modulate(layer_norm(txt), c_shift2, c_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text, image] tokens: `linear1` gives qkv and the feed-forward input, `linear2` sums both."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden_dim: int, **kw):
        super().__init__()
        self.hidden_size, self.head_dim, self.mlp_hidden_dim = hidden_size, head_dim, mlp_hidden_dim
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + mlp_hidden_dim, **kw)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden_dim, hidden_size, **kw)
        self.norm = QKNorm(head_dim, **kw)
        self.modulation = Modulation(hidden_size, 3, **kw)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: Rope) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x), shift, scale)).split([3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = (heads(t, self.head_dim) for t in qkv.chunk(3, dim=-1))
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, rope)
        return x + gate[:, None] * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=2))
