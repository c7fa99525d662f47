"""Z-Image Fun ControlNet units (alibaba-pai "Z-Image-Turbo-Fun-Controlnet-Union" 1 / 2.0 / 2.1) on a Z-Image MODEL,
with the suite's strength, start/end, control mode, region mask and stacking (see `comfy_patch` for the Qwen-Image
blockwise units this follows).

What the library needs from one base forward (`controlnet_core.zimage`): the timestep embedding (`adaln_input`), the
rotary table of the image tokens, the image tokens as they enter the noise refiner and as they enter the first main
block, and a place to add its outputs after noise-refiner block i (versions 2.x) and after main block k.

How we reach those block boundaries, and why two ways:

- Hosts with NextDiT's patch points (ComfyUI 0.8.0: `patches["noise_refiner"]` and `patches["double_block"]`, set by
  `ModelPatcher.set_model_noise_refiner_patch`): our group is entered in both lists, as the host's own
  `ZImageControlPatch` is. Those hooks hand over exactly the pieces above (`img`, `img_input`, `pe`, `vec`, `x`,
  `block_index`, `block_type`), and using them keeps us composable with the host's own patches and any other node
  that patches the same blocks.
- Hosts without them (ComfyUI 0.3.75, whose NextDiT has the Z-Image base but calls no block patches): a
  `WrappersMP.DIFFUSION_MODEL` wrapper, which that NextDiT's `forward` does run, installs PyTorch forward hooks on the
  model's `noise_refiner[i]` and `layers[k]` for the duration of that one forward and removes them afterwards (also on
  errors). A pre-hook on `noise_refiner[0]` reads the tokens entering the refiner, the image rotary table and the
  timestep embedding from the block's own arguments (`x, x_mask, freqs_cis, adaln_input`); a pre-hook on `layers[0]`
  reads the joint sequence entering the main blocks, whose caption part is its length minus the image tokens'; the
  forward hooks add the outputs to the block's output, at the same places the 0.8.0 hooks add them. No host code is
  patched, and the hooks exist only while our wrapper runs, so other clones of the model are not affected. The
  control network is handed to the host's loader as an additional model of the MODEL (`set_additional_models`), as
  patches' `models()` are on 0.8.0.

Both paths call the same `_Forward` object, so they compute the same numbers.

Which control layer acts after which block: the library's `ZImageFunConfig.layer_places` over Z-Image-Turbo's 30
blocks (the published files' fixed places, ComfyUI's `round(30 / layers)` rule), whatever the depth of the base.

Soft modes: the outputs of one unit (the refiner outputs first, then the control layers) are spread over SD1.5's
span, the first weakest (0.825^12) and the last 1, as the Qwen-Image units do over their blocks.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..controlnet_core import ControlMode, ControlNetError, IncompatibleModelError, LoadedControl, ResizeMode, check_hint_size, prepare_hint
from ..controlnet_core.flux import hint_latent_from_vae
from ..controlnet_core.hint import match_batch
from ..controlnet_core.precision import compute_dtype_of
from ..controlnet_core.zimage import LATENT_CHANNELS
from .comfy_patch import SuiteBlockPatch, _currently_loaded

log = logging.getLogger(__name__)
KEY = "controlnet_suite_zimage"  # our wrapper's and additional models' key on a MODEL (hosts without patch points)
_QKV = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")


def host_has_patch_points() -> bool:
    """Whether this host's NextDiT calls `noise_refiner` / `double_block` patches (ComfyUI 0.8.0 and later)."""
    return hasattr(comfy.model_patcher.ModelPatcher, "set_model_noise_refiner_patch")


def is_zimage_model(model) -> bool:
    """A Z-Image base: ComfyUI's Lumina2 NextDiT with Z-Image's modulation (one Linear over the 256-wide t embedding,
    where Lumina 2 has SiLU + Linear)."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None or type(dm).__module__.rsplit(".", 2)[-2:] != ["lumina", "model"] or not hasattr(dm, "noise_refiner"):
        return False
    mod = getattr(dm.layers[0], "adaLN_modulation", None) if len(dm.layers) else None
    return mod is not None and len(mod) == 1


def file_state_dict_from_host(sd: dict) -> dict:
    """ComfyUI's `ZImage_Control` state dict (after its `z_image_convert`: fused `qkv`, `out`, `q_norm` / `k_norm`)
    -> the published file's keys, which our format reads. `qkv` is [q; k; v] (ComfyUI concatenates them so)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".attention.qkv.weight"):
            for suffix, part in zip(_QKV, v.chunk(3, dim=0)):
                out[k[:-len(".attention.qkv.weight")] + suffix] = part
            continue
        for theirs, ours in ((".attention.out.", ".attention.to_out.0."), (".attention.q_norm.", ".attention.norm_q."),
                             (".attention.k_norm.", ".attention.norm_k.")):
            k = k.replace(theirs, ours)
        out[k] = v
    return out


def check_vae(vae, who: str) -> None:
    """Z-Image reads the condition image through the Flux VAE (16 channels, 2-D latents, 8x): refuse anything else
    before sampling, rather than fail in the middle of it."""
    if vae is None:
        raise ControlNetError(f"{who}: no VAE is connected (the checkpoint has none?); load Z-Image's VAE (the Flux VAE, "
                              "ae.safetensors) with a VAE Loader and connect it.")
    channels, dims = getattr(vae, "latent_channels", None), getattr(vae, "latent_dim", 2)
    ratio = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else 8
    if channels != LATENT_CHANNELS or dims != 2 or ratio != 8:
        raise ControlNetError(f"{who}: the connected VAE makes {channels}-channel {dims}-D latents at 1/{ratio} of the image size; "
                              "a Z-Image ControlNet reads the condition image through Z-Image's own VAE (the Flux VAE, 16 channels, "
                              "2-D, 1/8): connect that one.")


class SuiteZImagePatch(SuiteBlockPatch):
    """One Z-Image Fun ControlNet unit on one MODEL: settings, its hint latent (encoded once per latent size) and, per
    base forward, a `_Run` driving the library's `ZImageControlSteps`."""

    def __init__(self, loaded: LoadedControl, patcher, *, vae, image: Optional[torch.Tensor], strength: float,
                 sigma_range: tuple[float, float], mode=ControlMode.BALANCED, resize_mode=ResizeMode.CROP,
                 mask: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None,
                 inpaint_image: Optional[torch.Tensor] = None, name: str = "Z-Image ControlNet"):
        super().__init__(loaded, patcher, vae=vae, image=image, strength=strength, sigma_range=sigma_range, mode=mode,
                         resize_mode=resize_mode, mask=mask, keep=keep, name=name)
        self.inpaint_image = inpaint_image  # (B, C, H, W), 0..1, or None (a grey image, as ComfyUI)
        cfg = self.net.config
        self.outputs = len(cfg.refiner_places()) + cfg.num_control_layers  # for the soft modes' span

    def __call__(self, kwargs: dict) -> dict:  # not a host patch by itself: always inside a SuiteZImageGroup
        raise TypeError("SuiteZImagePatch runs inside a SuiteZImageGroup")

    def begin(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor, options: dict) -> Optional["_Run"]:
        """This unit's control run for one base forward, or None when it does not act in this step."""
        if self.strength == 0 or not self._in_range(options):
            return None
        hint = self._hint_tokens(x)
        rows = vec.shape[0]
        if hint.shape[0] != rows:
            hint = hint.expand(rows, -1, -1) if hint.shape[0] == 1 else match_batch(hint, rows, "hint", len(options.get("cond_or_uncond") or [0]))
        return _Run(self, self.net.start(hint, vec, pe), x, options)

    def _hint_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The hint at the latent's size, embedded; cached per size (one VAE encode per sampling run)."""
        h, w = x.shape[-2] + x.shape[-2] % 2, x.shape[-1] + x.shape[-1] % 2  # the base pads the latent to whole patches
        if self._hint is not None and self._hint[0] == (h, w):
            return self._hint[1]
        check_hint_size(h * 8, w * 8, x.shape[0], who=self.name)
        loaded = _currently_loaded()
        try:
            hint = self._hint_latent(h, w)
        finally:
            if loaded is not None:
                comfy.model_management.load_models_gpu(loaded)
        param = next(self.net.parameters())
        tokens = self.net.embed_hint(hint.to(device=param.device, dtype=compute_dtype_of(self.net)))
        self._hint = ((h, w), tokens.to(x.device))
        return self._hint[1]

    def _hint_latent(self, h: int, w: int) -> torch.Tensor:
        """v1: the control latent (16). 2.x: control latent, keep mask (nearest), latent of the inpaint image with the
        repaint region grey (33), as ComfyUI's `ZImageControlPatch` builds them; no mask: mask 0, as there; no control
        image (inpainting only): the latent of a grey image, as there."""
        size = (h * 8, w * 8)
        if self.image is None:  # inpainting only: a grey control image, as ComfyUI's node encodes one
            inpaint = prepare_hint(self.inpaint_image, *size, 3, self.inpaint_image.shape[0], self.resize_mode)
            control = torch.full_like(inpaint, 0.5)
        else:
            control = prepare_hint(self.image, *size, 3, self.image.shape[0], self.resize_mode)
            inpaint = None if self.inpaint_image is None else prepare_hint(self.inpaint_image, *size, 3, self.inpaint_image.shape[0], self.resize_mode)
        parts = [self._encode(control, h, w)]
        if self.net.config.inpainting:
            if inpaint is None:
                inpaint = torch.full_like(control, 0.5)
            if self.keep is None:
                keep = torch.zeros(1, 1, h, w)
            else:
                k = self.keep[:, None].float()
                pixels = comfy.utils.common_upscale(k, size[1], size[0], "bilinear", "center").round()
                n = max(inpaint.shape[0], pixels.shape[0])
                inpaint = (match_batch(inpaint, n, "inpaint image") - 0.5) * match_batch(pixels, n, "inpainting mask") + 0.5
                keep = comfy.utils.common_upscale(k, w, h, "nearest", "center")
            parts += [keep, self._encode(inpaint, h, w)]
            n = max(p.shape[0] for p in parts)
            parts = [match_batch(p.float(), n, "inpainting input") for p in parts]
        return torch.cat([p.to(parts[0]) for p in parts], dim=1)

    def _encode(self, pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
        latent = self.vae.encode(pixels.movedim(1, -1))
        if latent.ndim == 5:
            latent = latent[:, :, 0]
        if latent.shape[1] != LATENT_CHANNELS or tuple(latent.shape[-2:]) != (h, w):
            raise ControlNetError(f"{self.name}: the VAE made a latent of shape {list(latent.shape)}; this patch needs [batch, 16, {h}, {w}] "
                                  "(connect the VAE of the Z-Image model being sampled: the Flux VAE).")
        return hint_latent_from_vae(latent.float())


class _Run:
    """One unit through one base forward: the library's steps, scaled, soft-weighted and masked."""

    def __init__(self, unit: SuiteZImagePatch, steps, x: torch.Tensor, options: dict):
        self.unit, self.steps, self.x, self.options = unit, steps, x, options
        self.refiners = len(unit.net.config.refiner_places())
        self.places = steps.places

    def refiner(self, index: int, x_input: torch.Tensor) -> Optional[torch.Tensor]:
        return self._scaled(self.steps.after_refiner_block(index, x_input), index)

    def block(self, index: int, x_input: torch.Tensor) -> Optional[torch.Tensor]:
        out = self.steps.after_base_block(index, x_input)
        return None if out is None else self._scaled(out, self.refiners + self.places.index(index))

    def _scaled(self, out: Optional[torch.Tensor], position: int) -> Optional[torch.Tensor]:
        if out is None:
            return None
        u = self.unit
        return u._masked(out * (u.strength * u._mode_weight(position, u.outputs)), self.x, self.options)


class _Forward:
    """The group's units through one base forward: opened at the first hook, then the hooks in block order."""

    def __init__(self, units: tuple, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor, options: dict):
        self.runs = [r for r in (u.begin(x, vec, pe, options) for u in units) if r is not None]
        self.main_started = False

    def after_refiner(self, index: int, x_input: torch.Tensor, img: torch.Tensor) -> None:
        _add(img, [r.refiner(index, x_input) for r in self.runs])

    def after_block(self, index: int, x_input: torch.Tensor, img: torch.Tensor) -> None:
        self.main_started = True
        _add(img, [r.block(index, x_input) for r in self.runs])


def _add(img: torch.Tensor, deltas: list) -> None:
    """The sum of the units' outputs added, in place, to the first image tokens (a stack is the sum of its units)."""
    deltas = [d for d in deltas if d is not None]
    if deltas:
        total = deltas[0] if len(deltas) == 1 else torch.stack([d.to(deltas[0]) for d in deltas]).sum(0)
        img[:, :total.shape[1]] += total.to(img.dtype)


class SuiteZImageGroup:
    """The suite's Z-Image units on one MODEL. On hosts with patch points it is the patch in both `noise_refiner` and
    `double_block`; elsewhere `ForwardHooks` (the DIFFUSION_MODEL wrapper) drives it."""

    def __init__(self, units: tuple):
        self.units = tuple(units)
        self._forward: Optional[_Forward] = None  # the forward in progress (patch points only)

    def with_unit(self, unit: SuiteZImagePatch) -> "SuiteZImageGroup":
        return SuiteZImageGroup(self.units + (unit,))

    def __deepcopy__(self, memo):
        return SuiteZImageGroup(tuple(copy.deepcopy(u, memo) for u in self.units))

    def to(self, device_or_dtype):
        for u in self.units:
            u.to(device_or_dtype)
        return self

    def models(self):
        return [u.patcher for u in self.units]

    def open(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor, options: dict) -> _Forward:
        return _Forward(self.units, x, vec, pe, options)

    # the host's patch points (0.8.0): kwargs as NextDiT hands them

    def __call__(self, kwargs: dict) -> dict:
        index, options = kwargs["block_index"], kwargs.get("transformer_options", {})
        refiner = kwargs.get("block_type") == "noise_refiner"
        if self._forward is None or (index == 0 and (refiner or self._forward.main_started)):
            self._forward = self.open(kwargs["x"], kwargs["vec"], kwargs["pe"], options)
        if refiner:
            self._forward.after_refiner(index, kwargs["img_input"], kwargs["img"])
        else:
            self._forward.after_block(index, kwargs["img_input"], kwargs["img"])
        return kwargs


class ForwardHooks:
    """The DIFFUSION_MODEL wrapper for hosts whose NextDiT calls no block patches: forward hooks on its
    `noise_refiner[i]` and `layers[k]` for this one forward (see the module docstring)."""

    def __init__(self, group: SuiteZImageGroup):
        self.group = group

    def to(self, device_or_dtype):
        self.group.to(device_or_dtype)
        return self

    def __call__(self, executor, x, timesteps, context, num_tokens, attention_mask=None, **kwargs):
        dm = executor.class_obj
        options = kwargs.get("transformer_options", {})
        seen: dict = {}
        handles = []

        def refiner_in(module, args, kw):
            tokens = args[0] if args else kw["x"]
            pe = args[2] if len(args) > 2 else kw["freqs_cis"]
            vec = args[3] if len(args) > 3 else kw["adaln_input"]
            seen["refiner_in"] = tokens
            seen["forward"] = self.group.open(x, vec, pe, options)

        def main_in(module, args, kw):
            tokens = args[0] if args else kw["x"]
            seen["cap"] = tokens.shape[1] - seen["refiner_in"].shape[1]
            seen["main_in"] = tokens[:, seen["cap"]:]

        def after_refiner(i):
            def hook(module, args, output):
                seen["forward"].after_refiner(i, seen["refiner_in"], output)
                return output
            return hook

        def after_block(k):
            def hook(module, args, output):
                seen["forward"].after_block(k, seen["main_in"], output[:, seen["cap"]:])
                return output
            return hook

        try:
            if len(dm.noise_refiner) == 0:
                raise IncompatibleModelError(f"{self.group.units[0].name}: this Z-Image model has no noise-refiner blocks, which the "
                                             "ControlNet hooks into; connect a Z-Image (Turbo) model.")
            handles.append(dm.noise_refiner[0].register_forward_pre_hook(refiner_in, with_kwargs=True))
            handles += [b.register_forward_hook(after_refiner(i)) for i, b in enumerate(dm.noise_refiner)]
            if len(dm.layers):
                handles.append(dm.layers[0].register_forward_pre_hook(main_in, with_kwargs=True))
            handles += [b.register_forward_hook(after_block(k)) for k, b in enumerate(dm.layers)]
            return executor(x, timesteps, context, num_tokens, attention_mask, **kwargs)
        finally:
            for h in handles:
                h.remove()


def add_zimage_unit(model, unit: SuiteZImagePatch):
    """A clone of `model` with `unit` joined to the suite's Z-Image group (our last patch or wrapper, if any)."""
    out = model.clone()
    if host_has_patch_points():
        patches = out.model_options["transformer_options"].setdefault("patches", {})
        refiner, double = patches.setdefault("noise_refiner", []), patches.setdefault("double_block", [])
        group = refiner[-1] if refiner and isinstance(refiner[-1], SuiteZImageGroup) else None
        if group is not None and double and double[-1] is group:
            refiner[-1] = double[-1] = group.with_unit(unit)
        else:
            group = SuiteZImageGroup((unit,))
            refiner.append(group)
            double.append(group)
        return out
    import comfy.patcher_extension  # here, not at the top: hosts before 2025 have no wrapper API (and no Z-Image either)

    wrappers = out.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)
    group = wrappers[-1].group.with_unit(unit) if wrappers and isinstance(wrappers[-1], ForwardHooks) else SuiteZImageGroup((unit,))
    out.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)
    out.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, ForwardHooks(group))
    out.set_additional_models(KEY, group.models())
    return out


__all__ = ["ForwardHooks", "SuiteZImageGroup", "SuiteZImagePatch", "add_zimage_unit", "check_vae", "file_state_dict_from_host",
           "host_has_patch_points", "is_zimage_model"]
