"""Qwen-Image transformer blocks under diffusers' parameter names (`transformer_blocks.N.img_mod.1`, `attn.to_q`,
`img_mlp.net.0.proj`, ...), the names of InstantX-layout Qwen-Image ControlNet files, and its token positions.

Qwen-Image (Qwen team 2025, https://arxiv.org/abs/2508.02324) is an MMDiT of 60 "double-stream" blocks: image and
text tokens keep their own weights and attend jointly, text first. Its operations are Flux.1's double blocks
(adaLN shift / scale / gate, RMS-normalised queries and keys, rotary positions over (frame, row, column), tanh-GELU
feed-forwards), so the attention and the rotary tables are `controlnet_core.flux`'s; what differs is the names, the
text RMSNorm at the input, a timestep-only conditioning vector (no pooled text, no guidance) and where the tokens sit
in rotary space (`position_ids`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..flux.blocks_diffusers import FluxAttention
from ..flux.layers import Rope, attention, layer_norm, modulate, time_embedding
from ..mmdit.layers import FeedForward
from .config import TIME_FREQ_DIM


class TimestepEmbedding(nn.Module):
    """sigma -> the (B, hidden) vector that modulates every block: [cos | sin] of sigma x 1000, then
    linear_1 -> SiLU -> linear_2 (diffusers' `time_text_embed.timestep_embedder`)."""

    def __init__(self, hidden_size: int, **kw):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FREQ_DIM, hidden_size, **kw)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, **kw)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(time_embedding(timesteps, dtype))))


class TimeTextEmbedding(nn.Module):
    """Holds only the timestep embedder; the name is the checkpoints' (`time_text_embed.timestep_embedder.*`)."""

    def __init__(self, hidden_size: int, **kw):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(hidden_size, **kw)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timesteps, dtype)


class Modulation(nn.Sequential):
    """SiLU -> Linear to six (B, hidden) vectors: shift, scale, gate of the attention, then of the feed-forward.
    A Sequential so the linear layer is `.1`, as the checkpoints name it (`img_mod.1.weight`)."""

    def __init__(self, hidden_size: int, **kw):
        super().__init__(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, **kw))

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(emb).chunk(6, dim=-1)


class QwenImageBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, hidden_size: int, head_dim: int, mlp_hidden_dim: int, **kw):
        super().__init__()
        self.img_mod = Modulation(hidden_size, **kw)
        self.txt_mod = Modulation(hidden_size, **kw)
        self.attn = FluxAttention(hidden_size, head_dim, joint=True, **kw)  # the same diffusers Attention, same names
        self.img_mlp = FeedForward(hidden_size, mlp_hidden_dim, **kw)
        self.txt_mlp = FeedForward(hidden_size, mlp_hidden_dim, **kw)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, emb: torch.Tensor, rope: Rope,
                text_out: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, T, C), txt (B, L, C), emb (B, C) -> (img, txt).

        text_out=False skips the text stream after attention (its output projection and MLP) and returns the text
        unchanged: a ControlNet's last block feeds only its image tokens onwards, so that work would be thrown away
        (the image result is the same bit for bit)."""
        shift, scale, gate, shift2, scale2, gate2 = self.img_mod(emb)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = self.txt_mod(emb)
        q, k, v = self.attn.qkv(modulate(layer_norm(img), shift, scale))
        tq, tk, tv = self.attn.qkv(modulate(layer_norm(txt), t_shift, t_scale), text=True)
        out = attention(torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2), rope)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]

        img = img + gate[:, None] * self.attn.to_out[0](img_out)
        img = img + gate2[:, None] * self.img_mlp(modulate(layer_norm(img), shift2, scale2))
        if not text_out:
            return img, txt
        txt = txt + t_gate[:, None] * self.attn.to_add_out(txt_out)
        txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(layer_norm(txt), t_shift2, t_scale2))
        return img, txt


def position_ids(text_tokens: int, rows: int, cols: int, *, diffusers_centre: bool = False, device=None) -> torch.Tensor:
    """(L + rows*cols, 3) rotary positions of [text tokens, image tokens] over (frame, row, column).

    Image tokens are centred on the grid: frame 0, row r - rows // 2, column c - cols // 2 (ComfyUI's
    `process_img`). The text follows the image on the diagonal: token j at (s + j, s + j, s + j) with
    s = max(rows // 2, cols // 2), in ComfyUI and diffusers alike.

    `diffusers_centre=True` gives diffusers' centring (`QwenEmbedRope` with `scale_rope`): row r - (rows - rows // 2).
    It equals ComfyUI's for even grids; for an odd one (the default 1328 px gives 83 x 83 tokens) every image token
    sits one row (column) lower, which leaves image-to-image attention unchanged but moves the image against the text.
    """
    def axis(n: int) -> torch.Tensor:
        start = -(n - n // 2) if diffusers_centre else -(n // 2)
        return torch.arange(n, device=device, dtype=torch.float32) + start

    ids = torch.zeros(text_tokens + rows * cols, 3, device=device)
    start = max(rows // 2, cols // 2)
    ids[:text_tokens] = (torch.arange(text_tokens, device=device, dtype=torch.float32) + start)[:, None]
    r, c = torch.meshgrid(axis(rows), axis(cols), indexing="ij")
    ids[text_tokens:, 1] = r.flatten()
    ids[text_tokens:, 2] = c.flatten()
    return ids
