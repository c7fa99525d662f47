"""Union ControlNets (xinsir ControlNet++ / ProMax for SDXL): one network, a control type per condition, and
several conditions fused into one forward pass.

The extra modules, named like the checkpoint's keys (the "layes" typo is the published name):

- ``task_embedding`` (types, width): a learnt vector per control type, added to the condition's pooled feature;
- ``transformer_layes``: CLIP-style residual blocks over those pooled features, one token per condition;
- ``spatial_ch_projs``: a zero-initialised linear layer turning each token into a per-channel offset;
- ``control_add_embedding``: an MLP over the sinusoidal embedding of the 0/1 type vector, added to the time embedding.

Why each token attends only to itself. The reference code (xinsir's, and diffusers' `ControlNetUnionModel`) feeds
(batch, tokens, width) to an `nn.MultiheadAttention` built without `batch_first`, so the attention runs along the
*batch* axis: tokens of one image never meet, while different images of a batch do. Where a batch shares its
hints (one image, or the conditional and unconditional copies of classifier-free guidance) every attention row
averages equal values, which is the token's own value projection; ComfyUI's core (one condition, batch-first)
computes the same. Here that value is computed directly, so the result never depends on what else is in the batch
(ComfyUI batches the conditional and unconditional passes together or apart depending on free memory). The
reference's extra token for the latent itself changes nothing under that rule and is left out.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ControlNetError
from .layers import timestep_embedding

# The type ids the checkpoints were trained with (ComfyUI's `SetUnionControlNetType` uses the same numbers).
UNION_TYPES = {
    "openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2, "canny/lineart/anime_lineart/mlsd": 3,
    "normal": 4, "segment": 5, "tile": 6, "repaint": 7,
}


def type_name(index: int) -> str:
    return next((k for k, v in UNION_TYPES.items() if v == index), str(index))


class _SelfAttention(nn.Module):
    """Holds the reference's `nn.MultiheadAttention` weights; see the module docstring for why only V is used."""

    def __init__(self, width: int, **kw):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width, **kw))
        self.out_proj = nn.Linear(width, width, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        return self.out_proj(F.linear(x, self.in_proj_weight[2 * w :], self.in_proj_bias[2 * w :]))


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class UnionBlock(nn.Module):
    def __init__(self, width: int, **kw):
        super().__init__()
        self.attn = _SelfAttention(width, **kw)
        self.ln_1 = nn.LayerNorm(width, **kw)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width, **kw))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width, **kw))
        self.ln_2 = nn.LayerNorm(width, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ControlTypeEmbedding(nn.Module):
    """The 0/1 vector of the types in use -> an addition to the time embedding."""

    def __init__(self, num_types: int, type_dim: int, emb_dim: int, **kw):
        super().__init__()
        self.num_types, self.type_dim = num_types, type_dim
        self.linear_1 = nn.Linear(type_dim * num_types, emb_dim, **kw)
        self.linear_2 = nn.Linear(emb_dim, emb_dim, **kw)

    def forward(self, types: Sequence[int], batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        flags = torch.zeros(self.num_types, device=device)
        if len(types):
            flags[list(types)] = 1.0
        e = timestep_embedding(flags, self.type_dim).reshape(1, -1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(e))).expand(batch, -1)


def add_union_modules(net: nn.Module, width: int, emb_dim: int, num_types: int, num_layers: int, type_dim: int, **kw) -> None:
    """Attach the union extras to a ControlNet at the top level, where the checkpoint keeps them."""
    net.task_embedding = nn.Parameter(torch.empty(num_types, width, **kw))
    net.transformer_layes = nn.ModuleList([UnionBlock(width, **kw) for _ in range(num_layers)])
    net.spatial_ch_projs = nn.Linear(width, width, **kw)
    net.control_add_embedding = ControlTypeEmbedding(num_types, type_dim, emb_dim, **kw)


def check_types(types: Sequence[int], num_types: int, what: str = "union ControlNet") -> None:
    bad = [t for t in types if not 0 <= t < num_types]
    if bad:
        names = ", ".join(f"{type_name(t)} ({t})" for t in bad)
        raise ControlNetError(
            f"{what}: control type {names} is not one of the {num_types} types this file was trained with "
            f"({', '.join(type_name(i) for i in range(num_types))}). The 8-type ProMax file also has tile and repaint.")


def fuse_conditions(net, encoded: Sequence[torch.Tensor], types: Sequence[int], weights: Optional[Sequence[float]]) -> torch.Tensor:
    """Several encoded conditions (each (B, width, h, w)) -> the one feature map added after the first block.

    `weights` scale each condition and its token as the reference's per-condition `conditioning_scale` does when
    there are several; with a single condition the caller applies its weight to the residuals instead.
    """
    if weights is None or len(encoded) == 1:
        weights = [1.0] * len(encoded)
    task = net.task_embedding
    tokens = [(e.mean(dim=(2, 3)) + task[t].to(e.dtype)) * w for e, t, w in zip(encoded, types, weights)]
    x = torch.stack(tokens, dim=1)
    for layer in net.transformer_layes:
        x = layer(x)
    fused = None
    for i, (e, w) in enumerate(zip(encoded, weights)):
        alpha = net.spatial_ch_projs(x[:, i])[..., None, None]
        part = e * w + alpha * w if w != 1.0 else e + alpha
        fused = part if fused is None else fused + part
    return fused
