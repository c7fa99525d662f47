"""The toy world the paper's experiments are reproduced in: 128 px circles, a word-level prompt encoder, a
pooling "VAE" and the base UNet's architecture.

Why a second toy next to `toy.py`: `toy.py` is the smallest thing the trainer's tests can run on (64 px,
byte embeddings, a random base). Reproducing the paper needs a world where a base model can really learn to
draw what the prompt says and where the shape survives the trip through latent space:
- 128 px images: the hint encoder of the ldm ControlNet downsamples by exactly 8 (ComfyUI's loader assumes
  it), so latents are 16x16 and a circle of radius 16..40 px spans 4..10 latent pixels;
- prompts are read word by word with a position embedding, so "red circle with blue background" and
  "blue circle with red background" differ (byte embeddings without positions would be the same multiset);
- the "VAE" is area averaging by 8 (plus a luminance channel, 4 channels as SD's); the decoder upsamples
  bilinearly, so an edge that falls inside a latent pixel comes back where the area average puts it.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ControlNetConfig
from ..unet import UNetConfig
from .toy import COLOURS, write_fill50k

IMAGE_SIZE = 128  # pixels; latents are IMAGE_SIZE / 8
OUTLINE_WIDTH = 1  # pixels of the condition's outline: drawn on the filled circle's own edge pixels
PALETTE = tuple(sorted(COLOURS))  # colour names, a fixed order
WORDS = ("<pad>", *PALETTE, "circle", "with", "background")
CONTEXT_DIM = 32
TOKENS = 8

# ~2.7 M parameters (5.5 MB in fp16): attention at 8x8 and 4x4, where the prompt's colours are read.
TOY_BASE_UNET = UNetConfig(ControlNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
                                            transformer_depth=(0, 1, 1), context_dim=CONTEXT_DIM))


def prompt_for(fg: str, bg: str) -> str:
    return f"{fg} circle with {bg} background"


def draw_pair(centre: tuple[int, int], radius: int, fg: str, bg: str, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(condition, target) as RGB uint8: a white outline on black, and the filled circle on its background."""
    import cv2

    cond = np.zeros((size, size, 3), np.uint8)
    cv2.circle(cond, centre, radius, (255, 255, 255), OUTLINE_WIDTH, lineType=cv2.LINE_8)
    tgt = np.full((size, size, 3), COLOURS[bg], np.uint8)
    cv2.circle(tgt, centre, radius, COLOURS[fg], -1, lineType=cv2.LINE_8)
    return cond, tgt


def random_circle(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[tuple[int, int], int, str, str]:
    """Centre, radius and (foreground, background) colour names; the circle stays 4 px inside the image."""
    fg, bg = rng.sample(PALETTE, 2)
    r = rng.randint(size // 8, size * 5 // 16)
    c = (rng.randint(r + 4, size - r - 5), rng.randint(r + 4, size - r - 5))
    return c, r, fg, bg


def make_toy_world(root: Path, n: int = 4000, seed: int = 0, size: int = IMAGE_SIZE) -> Path:
    """Write `n` (condition, target, prompt) triples in the fill50k layout (prompt.json, source/, target/)."""
    rng = random.Random(seed)

    def triples():
        for _ in range(n):
            c, r, fg, bg = random_circle(rng, size)
            yield (*draw_pair(c, r, fg, bg, size), prompt_for(fg, bg))

    return write_fill50k(root, triples())


class ToyPromptEncoder(nn.Module):
    """Words -> fixed random vectors plus a fixed random position vector, (B, TOKENS, CONTEXT_DIM).

    A frozen stand-in for CLIP: deterministic from its seed, nothing downloaded, and order-aware, so the
    cross-attention can tell the foreground colour from the background colour. Unknown words map to <pad>."""

    def __init__(self, dim: int = CONTEXT_DIM, tokens: int = TOKENS, seed: int = 11):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tokens = tokens
        self.register_buffer("words", torch.randn(len(WORDS), dim, generator=g))
        self.register_buffer("positions", 0.5 * torch.randn(tokens, dim, generator=g))
        self.index = {w: i for i, w in enumerate(WORDS)}

    def ids(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.tokens, dtype=torch.long)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.lower().split()[: self.tokens]):
                out[i, j] = self.index.get(w, 0)
        return out

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.words[self.ids(list(prompts)).to(self.words.device)] + self.positions


def encode_image(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> (B,4,H/8,W/8): 8x8 area means of R, G, B and their mean (the toy "VAE")."""
    x = F.avg_pool2d(images, 8)
    return torch.cat([x, x.mean(1, keepdim=True)], 1)


def decode_latent(latents: torch.Tensor) -> torch.Tensor:
    """(B,4,h,w) -> (B,3,8h,8w) in [-1,1]: the RGB channels upsampled bilinearly (the luminance one is unused)."""
    return F.interpolate(latents[:, :3].float(), scale_factor=8, mode="bilinear", align_corners=False).clamp(-1, 1)


__all__ = ["IMAGE_SIZE", "PALETTE", "TOY_BASE_UNET", "ToyPromptEncoder", "decode_latent", "draw_pair", "encode_image",
           "make_toy_world", "prompt_for", "random_circle"]
