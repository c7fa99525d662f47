"""Prompts -> what the UNet is conditioned on, exactly as each SD family was trained.

- SD1.x: CLIP ViT-L's last layer after the final LayerNorm (77 x 768).
- SD2.x: OpenCLIP ViT-H's penultimate layer, then the final LayerNorm (77 x 1024); its tokens pad with 0.
- SDXL: CLIP ViT-L's penultimate layer (no final LayerNorm) next to OpenCLIP bigG's penultimate layer (no
  final LayerNorm), concatenated (77 x 2048); plus the label vector `y` = bigG's pooled, projected
  embedding (last layer, final LayerNorm, at the end token) followed by the sinusoidal embeddings of
  original size (h, w), crop top-left (0, 0) and target size (h, w), 256 channels each (2816 in all).
Diffusers folders keep their pipelines' choice: SD2's text_encoder/ is already cut to 23 layers, so its last
layer (with the final LayerNorm) is the ldm penultimate one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..identity import module_identity
from ..layers import timestep_embedding
from .clip_text import TextTransformer
from .tokenizer import CLIPTokenizer

SIZE_EMBED_DIM = 256  # SDXL's width per size value (fixed by the format: 2816 = 1280 + 6 * 256)


def sdxl_size_embedding(image_size: tuple[int, int], batch: int = 1, dim: int = SIZE_EMBED_DIM, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning for uncropped images of `image_size` (h, w): (batch, 6 * dim).

    The values are original size (h, w), crop top-left (0, 0) and target size (h, w), each embedded
    sinusoidally, in the order ComfyUI's and the ldm code's `SDXL.encode_adm` use. Shared by the CLI's
    text conditioner and the ComfyUI training node, so both feed the UNet the vector it sees at sampling.
    """
    h, w = image_size
    values = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=device)
    return timestep_embedding(values, dim).reshape(1, -1).expand(batch, -1)


@dataclass(frozen=True)
class Branch:
    """One text encoder's contribution: which layer, whether the final LayerNorm is applied, and the pad id."""

    layer: int  # -1 last, -2 penultimate
    final_norm: bool
    pad_id: int


class TextConditioner(nn.Module):
    """`encode_text` for the trainer: prompts -> context (B, 77, D), or (context, y) when a pooled branch feeds `y`."""

    def __init__(self, tokenizer: CLIPTokenizer, encoders: list[TextTransformer], branches: list[Branch],
                 pooled_from: Optional[int] = None, size_embed_dim: int = 0, image_size: tuple[int, int] = (1024, 1024)):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoders = nn.ModuleList(encoders)
        self.branches = branches
        self.pooled_from = pooled_from  # index of the encoder whose pooled output starts `y` (SDXL: bigG)
        self.size_embed_dim = size_embed_dim
        self.image_size = image_size  # (h, w) of the training images, for SDXL's size embeddings

    @property
    def context_dim(self) -> int:
        return sum(e.config.width for e in self.encoders)

    def size_embedding(self, batch: int, device=None) -> torch.Tensor:
        """SDXL's micro-conditioning for images trained at `image_size`, uncropped: (B, 6 * size_embed_dim)."""
        return sdxl_size_embedding(self.image_size, batch, self.size_embed_dim, device)

    @property
    def cache_identity(self) -> str:
        """For the trainer's text cache: the weights, plus the image size when `y` carries it (the cached `y`
        of one resolution must not be read back for another)."""
        ident = module_identity(self)
        return ident if self.pooled_from is None else f"{ident}:size{self.image_size[0]}x{self.image_size[1]}"

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        parts, pooled = [], None
        for i, (encoder, branch) in enumerate(zip(self.encoders, self.branches)):
            device = next(encoder.parameters()).device
            tokens = self.tokenizer(prompts, pad_id=branch.pad_id).to(device)
            if i == self.pooled_from:
                hidden, last = encoder(tokens, layers=(branch.layer, -1))
                pooled = encoder.pooled(encoder.final_norm(last), tokens, self.tokenizer.end_id)
            else:
                (hidden,) = encoder(tokens, layers=(branch.layer,))
            parts.append(encoder.final_norm(hidden) if branch.final_norm else hidden)
        context = torch.cat(parts, dim=-1)
        if pooled is None:
            return context
        y = torch.cat([pooled, self.size_embedding(len(prompts), pooled.device).to(pooled.dtype)], dim=-1)
        return context, y


__all__ = ["Branch", "SIZE_EMBED_DIM", "TextConditioner", "sdxl_size_embedding"]
