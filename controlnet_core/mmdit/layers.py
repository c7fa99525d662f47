"""MMDiT building blocks (Esser et al. 2024, "Scaling Rectified Flow Transformers", https://arxiv.org/abs/2403.03206),
named like diffusers' modules so that a diffusers-layout checkpoint's keys map one to one onto parameters.

Submodules that hold no weights in diffusers (SiLU, parameter-free LayerNorms, dropout) are plain function calls
here; the one exception is the empty slot 1 of `FeedForward.net`, kept so that its output layer is `net.2`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ControlNetError
from ..layers import timestep_embedding
from .config import HEAD_DIM, TIME_FREQ_DIM

_NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of the SD3 family


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without learnt scale or bias (diffusers `elementwise_affine=False`)."""
    return F.layer_norm(x, x.shape[-1:], eps=_NORM_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, C) scaled and shifted per sample by (B, C) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """Per-head RMS normalisation of queries and keys (SD3.5), with a learnt scale.

    Why the float32 detour: the reference computes the mean square in float32 and casts back to the weight's dtype
    only before the scale; doing the same keeps half-precision results equal to it."""

    def __init__(self, dim: int, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + _NORM_EPS)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class PatchEmbed(nn.Module):
    """Latent (B, C, H, W) -> tokens (B, (H/p)(W/p), hidden), plus the centre crop of a stored positional grid.

    `pos_embed_max_size=None` gives the plain projection (`pos_embed_input`, which has no positional term).
    Sizes that are not multiples of the patch are padded circularly, as ComfyUI's MMDiT does with its own input, so
    the token grid always matches the base model's; for multiples (the only sizes diffusers accepts) nothing changes.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, pos_embed_max_size: Optional[int] = None, **kw):
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, **kw)
        if pos_embed_max_size:
            # a persistent buffer, as in diffusers: the checkpoint stores it as `pos_embed.pos_embed`
            self.register_buffer("pos_embed", torch.zeros(1, pos_embed_max_size ** 2, hidden_size, **kw))
        else:
            self.pos_embed = None

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tokens per column and per row for a latent of this size."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def cropped_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """(1, rows*cols, hidden): the centre of the stored grid (how SD3 was trained at every resolution)."""
        side = self.pos_embed_max_size
        if rows > side or cols > side:
            raise ControlNetError(
                f"a latent of {rows}x{cols} tokens is larger than the {side}x{side} positional grid this ControlNet "
                f"stores (at most {side * self.patch_size * 8} px per side); use a smaller image.")
        top, left = (side - rows) // 2, (side - cols) // 2
        grid = self.pos_embed.reshape(1, side, side, -1)[:, top:top + rows, left:left + cols, :]
        return grid.reshape(1, rows * cols, -1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid(*latent.shape[-2:])
        pad_h, pad_w = rows * self.patch_size - latent.shape[-2], cols * self.patch_size - latent.shape[-1]
        if pad_h or pad_w:
            latent = F.pad(latent, (0, pad_w, 0, pad_h), mode="circular")
        tokens = self.proj(latent).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        if self.pos_embed is None:
            return tokens
        return (tokens + self.cropped_pos_embed(rows, cols)).to(tokens.dtype)


class _MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection share these names)."""

    def __init__(self, in_dim: int, out_dim: int, **kw):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, **kw)
        self.linear_2 = nn.Linear(out_dim, out_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """Timestep (0..1000) and pooled text vector -> the (B, hidden) vector that modulates every block."""

    def __init__(self, hidden_size: int, pooled_projection_dim: int, **kw):
        super().__init__()
        self.timestep_embedder = _MLP(TIME_FREQ_DIM, hidden_size, **kw)
        self.text_embedder = _MLP(pooled_projection_dim, hidden_size, **kw)

    def forward(self, timesteps: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(timesteps, TIME_FREQ_DIM).to(pooled.dtype)  # [cos | sin], as the reference
        return self.timestep_embedder(freqs) + self.text_embedder(pooled)


class AdaLayerNormZero(nn.Module):
    """The (B, hidden) conditioning -> `chunks` per-sample shift/scale/gate vectors (6; 9 with dual attention)."""

    def __init__(self, hidden_size: int, chunks: int, **kw):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(hidden_size, chunks * hidden_size, **kw)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(emb)).chunk(self.chunks, dim=1)


class FeedForward(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear, as diffusers' `FeedForward(activation_fn="gelu-approximate")`."""

    def __init__(self, dim: int, inner_dim: int, **kw):
        super().__init__()
        proj_in = nn.Module()
        proj_in.proj = nn.Linear(dim, inner_dim, **kw)
        # slot 1 is the reference's dropout: kept empty so the output layer is named `net.2` like in the checkpoints
        self.net = nn.ModuleList([proj_in, nn.Identity(), nn.Linear(inner_dim, dim, **kw)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads*64) -> (B, heads, T, 64)."""
    return x.unflatten(-1, (heads, HEAD_DIM)).transpose(1, 2)


class JointAttention(nn.Module):
    """Attention over image and text tokens together (MMDiT), each stream with its own projections.

    With `joint=False` it is the image-only self-attention of SD3.5's dual-attention blocks (`attn2`)."""

    def __init__(self, hidden_size: int, *, joint: bool, qk_norm: Optional[str], **kw):
        super().__init__()
        self.heads = hidden_size // HEAD_DIM
        self.to_q = nn.Linear(hidden_size, hidden_size, **kw)
        self.to_k = nn.Linear(hidden_size, hidden_size, **kw)
        self.to_v = nn.Linear(hidden_size, hidden_size, **kw)
        self.to_out = nn.ModuleList([nn.Linear(hidden_size, hidden_size, **kw)])  # to_out.1 is the reference's dropout
        self.norm_q = RMSNorm(HEAD_DIM, **kw) if qk_norm else None
        self.norm_k = RMSNorm(HEAD_DIM, **kw) if qk_norm else None
        self.joint = joint
        if joint:
            self.add_q_proj = nn.Linear(hidden_size, hidden_size, **kw)
            self.add_k_proj = nn.Linear(hidden_size, hidden_size, **kw)
            self.add_v_proj = nn.Linear(hidden_size, hidden_size, **kw)
            self.to_add_out = nn.Linear(hidden_size, hidden_size, **kw)
            self.norm_added_q = RMSNorm(HEAD_DIM, **kw) if qk_norm else None
            self.norm_added_k = RMSNorm(HEAD_DIM, **kw) if qk_norm else None

    def _qkv(self, x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, nq: Optional[RMSNorm], nk: Optional[RMSNorm]):
        q, k, v = (_heads(proj(x), self.heads) for proj in (q, k, v))
        return (nq(q) if nq is not None else q), (nk(k) if nk is not None else k), v

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None):
        """x (B, T, C) [, context (B, L, C)] -> x's output [, context's output]."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if not self.joint:
            out = F.scaled_dot_product_attention(q, k, v)
            return self.to_out[0](out.transpose(1, 2).flatten(2))
        cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)
        # image tokens first, then text tokens, as the reference concatenates them
        out = F.scaled_dot_product_attention(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2))
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        n = x.shape[1]
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-modulated joint attention and feed-forward for the image and the text stream.

    ControlNet blocks always keep the text stream's output layers (diffusers builds them with
    `context_pre_only=False`, even the last one), unlike the base model's last block."""

    def __init__(self, hidden_size: int, mlp_hidden_dim: int, *, qk_norm: Optional[str], dual_attention: bool, **kw):
        super().__init__()
        self.dual_attention = dual_attention
        self.norm1 = AdaLayerNormZero(hidden_size, 9 if dual_attention else 6, **kw)
        self.norm1_context = AdaLayerNormZero(hidden_size, 6, **kw)
        self.attn = JointAttention(hidden_size, joint=True, qk_norm=qk_norm, **kw)
        self.attn2 = JointAttention(hidden_size, joint=False, qk_norm=qk_norm, **kw) if dual_attention else None
        self.ff = FeedForward(hidden_size, mlp_hidden_dim, **kw)
        self.ff_context = FeedForward(hidden_size, mlp_hidden_dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), context (B, L, C), emb (B, C) -> (context, x), in the reference's order."""
        mod = self.norm1(emb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(emb)

        # 1. joint attention
        normed = _layer_norm(x)
        attn, c_attn = self.attn(_modulate(normed, shift_msa, scale_msa), _modulate(_layer_norm(context), c_shift_msa, c_scale_msa))
        x = x + gate_msa[:, None] * attn
        if self.attn2 is not None:  # SD3.5: a second attention over image tokens only, on the same normalised input
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            x = x + gate_msa2[:, None] * self.attn2(_modulate(normed, shift_msa2, scale_msa2))

        # 2. feed-forward of the image stream
        x = x + gate_mlp[:, None] * self.ff(_modulate(_layer_norm(x), shift_mlp, scale_mlp))

        # 3. the text stream
        context = context + c_gate_msa[:, None] * c_attn
        context = context + c_gate_mlp[:, None] * self.ff_context(_modulate(_layer_norm(context), c_shift_mlp, c_scale_mlp))
        return context, x
