"""The one place that knows ComfyUI's per-block model patches: a double-block patch over `controlnet_core`'s blockwise
ControlNets (DiffSynth's Qwen-Image files), with the suite's strength, start/end, control mode and region mask.

ComfyUI's Qwen-Image calls every `patches["double_block"]` entry after each transformer block k with the image tokens
(`img`), the base's input latent (`x`), `block_index` and `transformer_options` (its `sigmas` and `cond_or_uncond`),
and goes on with the `img` it returns. The host chains patches (each sees the tokens the previous one changed); the
suite's units on one MODEL are gathered in one `SuiteBlockPatchGroup` instead, so that, as for ControlNets, a stack is
the sum of its units: every unit's control is computed from the same tokens, then they are added together.

`ModelPatcher.clone` deep-copies its options, patches included: ours copy their settings only and share the network,
its patcher, the VAE and the image (a clone must not duplicate weights).
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import comfy.model_management
import comfy.utils
import torch
import torch.nn.functional as F

from ..controlnet_core import ControlMode, ControlNetError, IncompatibleModelError, LoadedControl, ResizeMode, check_hint_size, prepare_hint
from ..controlnet_core.hint import match_batch
from ..controlnet_core.modes import SOFT_SPAN
from ..controlnet_core.precision import compute_dtype_of
from ..controlnet_core.qwen import hint_latent_from_vae

log = logging.getLogger(__name__)


class SuiteBlockPatch:
    """One blockwise ControlNet unit on one MODEL."""

    def __init__(self, loaded: LoadedControl, patcher, *, vae, image: torch.Tensor, strength: float, sigma_range: tuple[float, float],
                 mode=ControlMode.BALANCED, resize_mode=ResizeMode.CROP, mask: Optional[torch.Tensor] = None,
                 keep: Optional[torch.Tensor] = None, name: str = "ControlNet patch"):
        self.net = loaded.model
        self.patcher = patcher
        self.vae = vae
        self.image = image  # (B, C, H, W), 0..1
        self.strength = strength
        self.sigma_range = sigma_range  # (start sigma, end sigma): steps with sigma in between are steered
        self.mode = ControlMode.parse(mode)
        self.resize_mode = ResizeMode.parse(resize_mode)
        self.mask = mask  # region mask (B, H, W) or None
        self.keep = keep  # inpainting: 1 where the image is kept, (B, H, W) or None (keep all)
        self.name = name
        self._hint: Optional[tuple] = None  # (latent size, hint tokens)
        self._masks: dict = {}

    def __deepcopy__(self, memo):
        c = copy.copy(self)
        c._hint, c._masks = None, {}
        return c

    # the host's patch protocol

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, torch.device) and self._hint is not None:
            self._hint = (self._hint[0], self._hint[1].to(device_or_dtype))
        return self

    def models(self):
        return [self.patcher]

    def __call__(self, kwargs: dict) -> dict:
        delta = self.delta(kwargs)
        if delta is not None:
            img = kwargs["img"]
            img[:, :delta.shape[1]] += delta.to(img.dtype)
        return kwargs

    def delta(self, kwargs: dict) -> Optional[torch.Tensor]:
        """This unit's scaled, masked control for the block `kwargs` describes, or None when it does not act there."""
        img, x, index = kwargs["img"], kwargs["x"], kwargs["block_index"]
        options = kwargs.get("transformer_options", {})
        if self.strength == 0 or not self._in_range(options):
            return None
        total = options.get("total_blocks")
        if total is not None and total > self.net.config.num_layers:
            raise IncompatibleModelError(f"{self.name} has {self.net.config.num_layers} control blocks, but the model has {total} "
                                         "transformer blocks; use the patch made for this model.")
        hint = self._hint_tokens(x)
        t = hint.shape[1]
        rows = img[:, :t]
        delta = self.net.block_residual(index, rows, hint.expand(rows.shape[0], -1, -1) if hint.shape[0] == 1 else
                                        match_batch(hint, rows.shape[0], "hint", len(options.get("cond_or_uncond") or [0])))
        weight = self.strength * self._mode_weight(index, total or self.net.config.num_layers)
        return self._masked(delta * weight, x, options)

    # the suite's unit settings

    def _in_range(self, options: dict) -> bool:
        sigmas = options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.flatten()[0])
        return self.sigma_range[1] <= sigma <= self.sigma_range[0]

    def _mode_weight(self, index: int, total: int) -> float:
        """Soft modes: SD1.5's span over the blocks (first 0.825^12, last 1); the blockwise outputs are all distinct."""
        if self.mode in (ControlMode.PROMPT, ControlMode.CONTROLNET) and total > 1:
            return 0.825 ** (SOFT_SPAN * (total - 1 - index) / (total - 1))
        return 1.0

    def _masked(self, delta: torch.Tensor, x: torch.Tensor, options: dict) -> torch.Tensor:
        """The region mask per token (mean over each token's patch), and no control on unconditional rows in
        "ControlNet is more important"."""
        cond_or_uncond = list(options.get("cond_or_uncond") or [0])
        per = delta.shape[0] // len(cond_or_uncond)
        if self.mask is not None:
            rows, cols = -(-x.shape[-2] // 2), -(-x.shape[-1] // 2)
            key = (rows, cols, delta.shape[0], delta.device, delta.dtype)
            if key not in self._masks:
                m = F.interpolate(self.mask[:, None].float().to(delta.device), size=(rows, cols), mode="area")
                m = match_batch(m, delta.shape[0], "mask", len(cond_or_uncond))
                self._masks[key] = m.flatten(2).transpose(1, 2).to(delta.dtype)
            delta = delta * self._masks[key]
        if self.mode is ControlMode.CONTROLNET and 1 in cond_or_uncond:
            keep_rows = torch.tensor([c == 0 for c in cond_or_uncond], device=delta.device).repeat_interleave(per)
            delta = delta * keep_rows[:, None, None].to(delta.dtype)
        return delta

    def _hint_tokens(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self._hint is not None and self._hint[0] == (h, w):
            return self._hint[1]
        check_hint_size(h * 8, w * 8, x.shape[0], who=self.name)
        pixels = prepare_hint(self.image, h * 8, w * 8, 3, self.image.shape[0], self.resize_mode)
        loaded = _currently_loaded()
        latent = self.vae.encode(pixels.movedim(1, -1))
        if loaded is not None:
            comfy.model_management.load_models_gpu(loaded)
        if latent.ndim == 5:
            latent = latent[:, :, 0]
        if latent.shape[1] != 16 or tuple(latent.shape[-2:]) != (h, w):
            raise ControlNetError(f"{self.name}: the VAE made a latent of shape {list(latent.shape)}; this patch needs [batch, 16, {h}, {w}] "
                                  "(connect the VAE of the Qwen-Image model being sampled).")
        hint = hint_latent_from_vae(latent.float())
        if self.net.config.extra_channels:
            if self.keep is None:
                keep = torch.ones(hint.shape[0], 1, h, w)
            else:
                keep = comfy.utils.common_upscale(self.keep[:, None].float(), w, h, "bilinear", "none")
                keep = match_batch(keep, hint.shape[0], "inpainting mask")
            hint = torch.cat([hint, keep.to(hint)], dim=1)
        param = next(self.net.parameters())
        tokens = self.net.encode_hint(hint.to(device=param.device, dtype=compute_dtype_of(self.net)))
        self._hint = ((h, w), tokens.to(x.device))
        return self._hint[1]


class SuiteBlockPatchGroup:
    """The suite's patch units on one MODEL: each computes its control from the tokens as the block left them, and the
    sum is added once (a stack is the sum of its units)."""

    def __init__(self, units: tuple):
        self.units = tuple(units)

    def with_unit(self, unit: SuiteBlockPatch) -> "SuiteBlockPatchGroup":
        return SuiteBlockPatchGroup(self.units + (unit,))

    def __deepcopy__(self, memo):
        return SuiteBlockPatchGroup(tuple(copy.deepcopy(u, memo) for u in self.units))

    def to(self, device_or_dtype):
        for u in self.units:
            u.to(device_or_dtype)
        return self

    def models(self):
        return [m for u in self.units for m in u.models()]

    def __call__(self, kwargs: dict) -> dict:
        deltas = [d for d in (u.delta(kwargs) for u in self.units) if d is not None]
        if deltas:
            img = kwargs["img"]
            total = deltas[0] if len(deltas) == 1 else torch.stack([d.to(deltas[0]) for d in deltas]).sum(0)
            img[:, :total.shape[1]] += total.to(img.dtype)
        return kwargs


def add_unit(model, unit: SuiteBlockPatch):
    """A clone of `model` with `unit` joined to the suite's group of patch units (the last double-block patch, if it is
    ours), or a new group after the patches already there."""
    out = model.clone()
    patches = out.model_options["transformer_options"].setdefault("patches", {}).setdefault("double_block", [])
    if patches and isinstance(patches[-1], SuiteBlockPatchGroup):
        patches[-1] = patches[-1].with_unit(unit)
    else:
        patches.append(SuiteBlockPatchGroup((unit,)))
    return out



def _currently_loaded() -> list:
    """The models the sampler has loaded (to reload them after the VAE), without entries whose model was already
    freed: the host's list holds weak references, and one that died reads as None and breaks `load_models_gpu`."""
    if not hasattr(comfy.model_management, "loaded_models"):
        return None
    return [m for m in comfy.model_management.loaded_models(only_currently_used=True) if m is not None]

__all__ = ["SuiteBlockPatch", "SuiteBlockPatchGroup", "add_unit"]
