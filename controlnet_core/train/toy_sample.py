"""Sampling the toy world: base UNet (+ ControlNet residuals) -> images, and the controllability score.

Why a module of its own: the demo, the experiments and the tests all need the same three things, done the
same way: load the shipped models through the library's own loaders, sample with the residuals injected by
`UNetModel` (DDIM, eta = 0, classifier-free guidance; the ControlNet sees the same hint in both CFG branches,
the paper's default), and score the result with `toy_metrics.controllability`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..checkpoint import open_checkpoint, save_safetensors
from ..loader import load_control
from ..model import ControlNet
from ..unet import UNetModel, unet_from_state_dict
from .sampling import ddim_sample
from .toy_metrics import controllability
from .toy_world import ToyPromptEncoder, decode_latent
from .trainer import sd_alphas_cumprod

PathLike = Union[str, Path]


def load_toy_base(path: PathLike, dtype: torch.dtype = torch.float32) -> UNetModel:
    """A base UNet saved by `save_toy_base` (bare ldm keys, any stored float dtype), computed in `dtype`."""
    src = open_checkpoint(Path(path))
    return unet_from_state_dict({k: src.get(k, dtype) for k in src.keys()})


def save_toy_base(unet: UNetModel, path: PathLike, dtype: Optional[torch.dtype] = torch.float16) -> Path:
    """Bare ldm UNet keys as safetensors (fp16 by default: the shipped file is half the size)."""
    sd = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    path = Path(path)
    save_safetensors(sd, path, {"format": "pt", "model": "toy base UNet (controlnet_core.train.toy_world)"})
    return path


def load_toy_controlnet(path: PathLike, dtype: torch.dtype = torch.float32) -> ControlNet:
    """A ControlNet file in any format the library reads (the shipped one is v1.1 ldm layout), computed in `dtype`."""
    return load_control(str(path), dtype=dtype).model.eval()


@torch.no_grad()
def sample(unet: UNetModel, controlnet: Optional[ControlNet], hints: torch.Tensor, prompts: Sequence[str], *,
           steps: int = 20, cfg: float = 3.0, seed: int = 0, prediction: str = "eps",
           encoder: Optional[ToyPromptEncoder] = None) -> torch.Tensor:
    """Images (B,3,H,W) in [0,1] for hints (B,3,H,W) in [0,1]; controlnet=None samples the base model alone.

    The same seed gives the same starting noise with and without the ControlNet, so the two differ only by
    the residuals. cfg=1 turns guidance off (one UNet call per step)."""
    encoder = encoder or ToyPromptEncoder()
    ctx, unc = encoder(list(prompts)), encoder([""] * len(prompts))
    latent_shape = (unet.config.encoder.in_channels, hints.shape[-2] // 8, hints.shape[-1] // 8)
    z = ddim_sample(unet, controlnet, hints if controlnet is not None else None, ctx, unc, sd_alphas_cumprod(),
                    latent_shape=latent_shape, steps=steps, cfg=cfg, seed=seed, prediction=prediction)
    return ((decode_latent(z).cpu() + 1) / 2).clamp(0, 1)


def score(unet: UNetModel, controlnet: Optional[ControlNet], hints: torch.Tensor, prompts: Sequence[str],
          **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, per-item IoU with the hints' shapes): sample, then `toy_metrics.controllability`."""
    images = sample(unet, controlnet, hints, prompts, **kw)
    return images, controllability(images, hints)


__all__ = ["load_toy_base", "load_toy_controlnet", "sample", "save_toy_base", "score"]
