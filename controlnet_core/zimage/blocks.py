"""The transformer blocks of a Z-Image Fun ControlNet, named as in the published file (diffusers' names: separate
`to_q` / `to_k` / `to_v`, `to_out.0`, per-head `norm_q` / `norm_k`, a SwiGLU `feed_forward` of w1 / w2 / w3, four
RMSNorms and a one-layer `adaLN_modulation`), so a state dict maps one to one onto the file.

The rotary table is the base model's (its positions depend on the caption length and the host's rope options), so the
blocks take it as an argument, in either host's form (`rope_cos_sin`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ControlNetError
from .config import NORM_EPS


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learnt `weight`."""

    def __init__(self, dim: int, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), NORM_EPS)


def rope_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's rotary table -> float32 (cos, sin) of shape (B, T, 1, head_dim / 2), broadcasting over heads.

    Accepted: diffusers' complex `freqs_cis` (B, T, head_dim / 2); ComfyUI's real rotation matrices as the Lumina2
    `NextDiT` hands its patches (`pe`: (B, T, 1, head_dim / 2, 2, 2), [[cos, -sin], [sin, cos]])."""
    if freqs.is_complex():
        if freqs.ndim != 3:
            raise ControlNetError(f"complex rotary table of shape {list(freqs.shape)}; expected (B, T, head_dim / 2).")
        return freqs.real.float().unsqueeze(2), freqs.imag.float().unsqueeze(2)
    if freqs.ndim != 6 or freqs.shape[-2:] != (2, 2):
        raise ControlNetError(f"rotary table of shape {list(freqs.shape)}; expected complex (B, T, head_dim / 2) or rotation "
                         "matrices (B, T, 1, head_dim / 2, 2, 2).")
    return freqs[..., 0, 0].float(), freqs[..., 1, 0].float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, T, heads, head_dim), in float32 as both references do."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, **kw):
        super().__init__()
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, dim, bias=False, **kw)
        self.to_k = nn.Linear(dim, dim, bias=False, **kw)
        self.to_v = nn.Linear(dim, dim, bias=False, **kw)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False, **kw)])
        self.norm_q = RMSNorm(head_dim, **kw)
        self.norm_k = RMSNorm(head_dim, **kw)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        q = self.norm_q(self.to_q(x).unflatten(-1, (-1, self.head_dim)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (-1, self.head_dim)))
        v = self.to_v(x).unflatten(-1, (-1, self.head_dim))
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if mask is not None and mask.ndim == 2:  # (B, T) True = a token to attend to
            mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, **kw):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False, **kw)
        self.w2 = nn.Linear(hidden, dim, bias=False, **kw)
        self.w3 = nn.Linear(dim, hidden, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Z-Image's modulated single-stream block (a version 1 `control_noise_refiner` block is exactly this)."""

    def __init__(self, dim: int, head_dim: int, ffn_dim: int, adaln_dim: int, **kw):
        super().__init__()
        self.attention = Attention(dim, head_dim, **kw)
        self.feed_forward = FeedForward(dim, ffn_dim, **kw)
        self.attention_norm1 = RMSNorm(dim, **kw)
        self.ffn_norm1 = RMSNorm(dim, **kw)
        self.attention_norm2 = RMSNorm(dim, **kw)
        self.ffn_norm2 = RMSNorm(dim, **kw)
        self.adaLN_modulation = nn.Sequential(nn.Linear(adaln_dim, 4 * dim, **kw))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln.to(x.dtype)).unsqueeze(1).chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


class ControlBlock(TransformerBlock):
    """A control layer: the first of a chain adds `before_proj(c)` to the base's tokens; every one runs the block on
    the control state and hands `after_proj` of it to the base (`forward` returns (output, new state))."""

    def __init__(self, dim: int, head_dim: int, ffn_dim: int, adaln_dim: int, first: bool, **kw):
        super().__init__(dim, head_dim, ffn_dim, adaln_dim, **kw)
        if first:
            self.before_proj = nn.Linear(dim, dim, **kw)
        self.after_proj = nn.Linear(dim, dim, **kw)

    @property
    def first(self) -> bool:
        return hasattr(self, "before_proj")

    def forward(self, c: torch.Tensor, x: torch.Tensor, adaln: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],  # type: ignore[override]
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            c = self.before_proj(c) + x.to(c.dtype)  # the base's tokens, in the control's compute dtype
        c = super().forward(c, adaln, rope, mask)
        return self.after_proj(c), c
