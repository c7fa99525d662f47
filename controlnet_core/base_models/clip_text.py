"""CLIP text transformers in the two layouts SD checkpoints store them in, named like their keys.

- `CLIPTextModel`: the Hugging Face layout (`text_model.embeddings/encoder.layers/final_layer_norm`, optional
  `text_projection` Linear): SD1.x's CLIP ViT-L (`cond_stage_model.transformer.*`), SDXL's first encoder
  (`conditioner.embedders.0.transformer.*`) and every diffusers `text_encoder*/` folder.
- `OpenCLIPTextModel`: the open_clip layout (`token_embedding`, `positional_embedding`,
  `transformer.resblocks.N` with a packed `attn.in_proj_weight`, `ln_final`, `text_projection` matrix):
  SD2.x's ViT-H (`cond_stage_model.model.*`) and SDXL's bigG (`conditioner.embedders.1.model.*`).

Both are the same pre-LayerNorm causal transformer; what an SD family takes from it (last or penultimate
layer, with or without the final LayerNorm, the pooled projection) is decided in `conditioning.py`.
Head counts are not in the weights: every CLIP text tower SD uses has 64 channels per head (ViT-L 12,
ViT-H 16, bigG 20), so that is the convention; a transformers `config.json` overrides it.
"""
from __future__ import annotations

import abc
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
_OC_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.")
# present in many files, used by none of the SD text encoders
IGNORED_KEYS = ("text_model.embeddings.position_ids", "logit_scale")


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int  # hidden size: 768 ViT-L, 1024 ViT-H, 1280 bigG
    layers: int  # 12 ViT-L, 24 ViT-H (23 in diffusers' SD2 folders), 32 bigG
    heads: int
    ff_width: int  # MLP hidden size (4 x width)
    vocab_size: int = 49408
    positions: int = 77
    activation: str = "quick_gelu"  # OpenAI's CLIP-L: quick_gelu; open_clip ViT-H/bigG: gelu
    projection_dim: Optional[int] = None  # output width of `text_projection`; None when the file has none


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = q.shape
    q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c)


class TextTransformer(nn.Module, abc.ABC):
    """What both layouts share: run the layers, keep the outputs asked for, pool at the end token."""

    config: TextEncoderConfig

    @abc.abstractmethod
    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Layout-specific; see the two subclasses."""

    @abc.abstractmethod
    def _blocks(self) -> Sequence[nn.Module]:
        """Layout-specific; see the two subclasses."""

    @abc.abstractmethod
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Layout-specific; see the two subclasses."""

    @abc.abstractmethod
    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Layout-specific; see the two subclasses."""

    def forward(self, tokens: torch.Tensor, layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """tokens (B, N) int64 -> the hidden states (B, N, width) after each layer in `layers` (0-based;
        negative counts from the end: -1 the last, -2 the penultimate), before the final LayerNorm.
        Layers after the deepest one asked for are not run."""
        blocks = self._blocks()
        idx = [i % len(blocks) for i in layers]
        x = self._embed(tokens)
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(blocks[: max(idx) + 1]):
            x = block(x)
            if i in idx:
                kept[i] = x
        return [kept[i] for i in idx]

    def pooled(self, last_normed: torch.Tensor, tokens: torch.Tensor, end_id: int) -> torch.Tensor:
        """The projected embedding at each sequence's first end token (CLIP's pooled text embedding)."""
        at = (tokens == end_id).int().argmax(dim=-1)
        return self.project(last_normed[torch.arange(tokens.shape[0], device=tokens.device), at])


# -- Hugging Face layout --

class _HFAttention(nn.Module):
    def __init__(self, width: int, heads: int, **kw):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width, **kw) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class _HFMLP(nn.Module):
    def __init__(self, width: int, ff: int, activation: str, **kw):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, ff, **kw), nn.Linear(ff, width, **kw)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _HFLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, **kw):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, **kw)
        self.self_attn = _HFAttention(cfg.width, cfg.heads, **kw)
        self.layer_norm2 = nn.LayerNorm(cfg.width, **kw)
        self.mlp = _HFMLP(cfg.width, cfg.ff_width, cfg.activation, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(TextTransformer):
    """transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` key layout."""

    def __init__(self, config: TextEncoderConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        tm = self.text_model = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, **kw)
        tm.embeddings.position_embedding = nn.Embedding(cfg.positions, cfg.width, **kw)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList(_HFLayer(cfg, **kw) for _ in range(cfg.layers))
        tm.final_layer_norm = nn.LayerNorm(cfg.width, **kw)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False, **kw)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.text_model.embeddings
        return e.token_embedding(tokens) + e.position_embedding.weight[: tokens.shape[1]]

    def _blocks(self) -> Sequence[nn.Module]:
        return self.text_model.encoder.layers

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_model.final_layer_norm(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "text_projection"):
            raise CheckpointError("this text encoder has no text_projection; the pooled output needs one.")
        return self.text_projection(pooled)

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], *, heads: Optional[int] = None, activation: str = "quick_gelu",
                           source: str = "text encoder") -> TextEncoderConfig:
        """Architecture from the (unprefixed) key shapes; `heads`/`activation` from a config.json when there is one."""
        need = "text_model.embeddings.token_embedding.weight"
        if need not in shapes:
            raise CheckpointError(f"{source}: no '{need}'; not a CLIP text encoder in the Hugging Face layout.")
        vocab, width = shapes[need]
        layers = 1 + max((int(m.group(1)) for k in shapes if (m := _HF_LAYER.match(k))), default=-1)
        if layers == 0:
            raise CheckpointError(f"{source}: no 'text_model.encoder.layers.*' keys; the text encoder has no layers.")
        proj = shapes.get("text_projection.weight")
        return TextEncoderConfig(
            width=width, layers=layers, heads=heads or max(1, width // 64),
            ff_width=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0], vocab_size=vocab,
            positions=shapes["text_model.embeddings.position_embedding.weight"][0], activation=activation,
            projection_dim=proj[0] if proj else None,
        )


# -- open_clip layout --

class _PackedAttention(nn.Module):
    """open_clip keeps q, k and v in one `in_proj_weight` (3 * width, width), as torch's MultiheadAttention."""

    def __init__(self, width: int, heads: int, dtype=None, device=None):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width, dtype=dtype, device=device))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width, dtype=dtype, device=device))
        self.out_proj = nn.Linear(width, width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class _ResidualBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, **kw):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, **kw)
        self.attn = _PackedAttention(cfg.width, cfg.heads, **kw)
        self.ln_2 = nn.LayerNorm(cfg.width, **kw)
        act = _GELU() if cfg.activation == "gelu" else _QuickGELU()
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(cfg.width, cfg.ff_width, **kw), gelu=act, c_proj=nn.Linear(cfg.ff_width, cfg.width, **kw)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextModel(TextTransformer):
    """open_clip's text tower key layout (the visual tower is not in SD checkpoints)."""

    def __init__(self, config: TextEncoderConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, **kw)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.positions, cfg.width, **kw))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_ResidualBlock(cfg, **kw) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width, **kw)
        if cfg.projection_dim:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim, **kw))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def _blocks(self) -> Sequence[nn.Module]:
        return self.transformer.resblocks

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "text_projection"):
            raise CheckpointError("this text encoder has no text_projection; the pooled output needs one.")
        return pooled @ self.text_projection  # a (width, projection) matrix, not a Linear

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], *, source: str = "text encoder") -> TextEncoderConfig:
        if "token_embedding.weight" not in shapes or "positional_embedding" not in shapes:
            raise CheckpointError(f"{source}: no 'token_embedding.weight'/'positional_embedding'; not an open_clip text tower.")
        vocab, width = shapes["token_embedding.weight"]
        layers = 1 + max((int(m.group(1)) for k in shapes if (m := _OC_LAYER.match(k))), default=-1)
        if layers == 0:
            raise CheckpointError(f"{source}: no 'transformer.resblocks.*' keys; the text encoder has no layers.")
        proj = shapes.get("text_projection")
        return TextEncoderConfig(
            width=width, layers=layers, heads=max(1, width // 64), ff_width=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
            vocab_size=vocab, positions=shapes["positional_embedding"][0], activation="gelu", projection_dim=proj[1] if proj else None,
        )


__all__ = ["TextEncoderConfig", "TextTransformer", "CLIPTextModel", "OpenCLIPTextModel", "IGNORED_KEYS", "quick_gelu"]
