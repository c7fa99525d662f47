"""The toy world: a procedurally generated fill50k-like dataset and stand-ins for CLIP and the VAE.

Condition: a circle outline; target: the circle filled with one colour on a background of another;
prompt: "<fg> circle with <bg> background". Small enough to train on a CPU, rich enough to show the
paper's effects (zero-convolution start, sudden convergence, empty-prompt ablation).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..config import ControlNetConfig
from ..unet import UNetConfig

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "white": (255, 255, 255), "purple": (128, 0, 255)}
TOY_UNET = UNetConfig(ControlNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1), context_dim=32))


def write_fill50k(root: Path, triples: Iterable[tuple[np.ndarray, np.ndarray, str]]) -> Path:
    """Write (condition RGB uint8, target RGB uint8, prompt) triples in the fill50k layout (prompt.json, source/,
    target/). prompt.json is written last and atomically: a folder that has it is complete."""
    import cv2

    root = Path(root)
    (root / "source").mkdir(parents=True, exist_ok=True)
    (root / "target").mkdir(exist_ok=True)
    lines = []
    for i, (cond, tgt, prompt) in enumerate(triples):
        cv2.imwrite(str(root / "source" / f"{i}.png"), cond[:, :, ::-1])
        cv2.imwrite(str(root / "target" / f"{i}.png"), tgt[:, :, ::-1])
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": prompt}))
    tmp = root / "prompt.json.part"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(root / "prompt.json")
    return root


def make_fill50k(root: Path, n: int = 200, size: int = 64, seed: int = 0) -> Path:
    """Write `n` (condition, target, prompt) triples in the fill50k layout under `root`."""
    import cv2

    rng = random.Random(seed)

    def triples():
        for _ in range(n):
            fg, bg = rng.sample(sorted(COLOURS), 2)
            r = rng.randint(size // 10, size // 4)
            c = (rng.randint(r + 2, size - r - 2), rng.randint(r + 2, size - r - 2))
            cond = np.zeros((size, size, 3), np.uint8)
            cv2.circle(cond, c, r, (255, 255, 255), 1)
            tgt = np.full((size, size, 3), COLOURS[bg], np.uint8)
            cv2.circle(tgt, c, r, COLOURS[fg], -1)
            yield cond, tgt, f"{fg} circle with {bg} background"

    return write_fill50k(root, triples())


class ToyTextEncoder(nn.Module):
    """Prompt bytes -> fixed random embeddings (B, tokens, dim): deterministic, no download, like a frozen CLIP."""

    def __init__(self, dim: int = 32, tokens: int = 16, seed: int = 9):
        super().__init__()
        self.tokens = tokens
        self.table = nn.Embedding(256, dim)
        nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(seed))
        self.requires_grad_(False)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.tokens, dtype=torch.long)
        for i, p in enumerate(prompts):
            b = list(p.encode()[: self.tokens])
            if b:
                ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        return self.table(ids.to(self.table.weight.device))


def toy_encode_image(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> (B,4,H/8,W/8): area downsampling + a luminance channel (a fixed, invertible-enough 'VAE')."""
    x = torch.nn.functional.avg_pool2d(images, 8)
    return torch.cat([x, x.mean(1, keepdim=True)], 1)


def toy_decode_latent(latents: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(latents[:, :3], scale_factor=8, mode="nearest").clamp(-1, 1)
