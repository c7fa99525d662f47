"""A minimal deterministic DDIM sampler (eta = 0) for validation images during training.

Why here: the validation grid needs samples from the base UNet + the ControlNet being trained, inside the
training process and without a UI host. DDIM with eta = 0 is deterministic given the starting noise, so the
grid of step 500 and step 1000 differ only by what the ControlNet learnt. Classifier-free guidance runs the
unconditional branch with the empty prompt, controlled as well (the paper's default, "balanced").
Any other sampler can be used for the grid instead: `report.TrainingReport` takes any `sample_fn`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..model import ControlNet
from ..unet import UNetModel


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """`steps` evenly spaced training timesteps, high to low, ending at the last one below train_steps/steps
    ("leading" spacing with offset 1, as Stable Diffusion's DDIM does)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"DDIM steps must be between 1 and {train_steps}, not {steps}.")
    stride = train_steps // steps
    return [i * stride + 1 for i in range(steps)][::-1]


@torch.no_grad()
def ddim_sample(unet: UNetModel, controlnet: Optional[ControlNet], hint: Optional[torch.Tensor], context: torch.Tensor,
                uncond_context: Optional[torch.Tensor], alphas_cumprod: torch.Tensor, *, latent_shape: tuple[int, ...],
                steps: int = 20, cfg: float = 7.5, seed: int = 0, prediction: str = "eps", strength: float = 1.0) -> torch.Tensor:
    """Latents (B, C, h, w) from noise seeded with `seed`; hint (B, 3, 8h, 8w) in [0, 1], None = no control."""
    device = next(unet.parameters()).device
    b = context.shape[0]
    x = torch.randn((b, *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    guided = uncond_context is not None and cfg != 1.0
    ctx = torch.cat([context, uncond_context.expand_as(context)]) if guided else context
    h = None if hint is None else (torch.cat([hint, hint]) if guided else hint).to(device)
    ts = ddim_timesteps(steps, len(alphas_cumprod))
    for i, t in enumerate(ts):
        a = alphas_cumprod[t].to(device)
        a_prev = alphas_cumprod[ts[i + 1]].to(device) if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        xin = torch.cat([x, x]) if guided else x
        tt = torch.full((xin.shape[0],), float(t), device=device)
        control = None
        if controlnet is not None and h is not None:
            control = controlnet(xin, h, tt, ctx)
            if strength != 1.0:
                control = control.map(lambda r: r * strength)
        out = unet(xin, tt, ctx, control=control).float()
        if guided:
            cond, unc = out.chunk(2)
            out = unc + cfg * (cond - unc)
        if prediction == "v":
            eps = a.sqrt() * out + (1 - a).sqrt() * x
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def make_sample_fn(unet: UNetModel, controlnet: ControlNet, encode_text: Callable[[list[str]], torch.Tensor],
                   decode: Callable[[torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor, *, steps: int = 20,
                   cfg: float = 7.5, seed: int = 0, prediction: str = "eps") -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """sample_fn(hints (B,3,H,W) in [0,1], prompts) -> images (B,3,H,W) in [0,1], for `report.TrainingReport`.

    decode: latents -> images in [-1, 1] (the VAE decoder, or the toy world's `toy_decode_latent`).
    """
    def sample(hints: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        was_training = controlnet.training
        controlnet.eval()
        try:
            ctx, unc = encode_text(list(prompts)), encode_text([""] * len(prompts))
            lat_shape = (unet.config.encoder.in_channels, hints.shape[-2] // 8, hints.shape[-1] // 8)
            z = ddim_sample(unet, controlnet, hints, ctx, unc, alphas_cumprod, latent_shape=lat_shape, steps=steps, cfg=cfg,
                            seed=seed, prediction=prediction)
            return ((decode(z).float().cpu() + 1) / 2).clamp(0, 1)
        finally:
            controlnet.train(was_training)

    return sample


__all__ = ["ddim_sample", "ddim_timesteps", "make_sample_fn"]
