"""Apply ControlNet Patch (Suite): model-patch ControlNets (DiffSynth's blockwise Qwen-Image files, alibaba-pai's Z-Image Fun
ControlNet union 1 / 2.0 / 2.1), MODEL in, MODEL out."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..controlnet_core import ControlMode, ControlNetError, IncompatibleModelError, ResizeMode, load_control
from ..controlnet_core.checkpoint import DictSource
from .apply import MODES, RESIZE_MODES
from .comfy_adapter import SuiteControl, make_patcher
from .comfy_patch import SuiteBlockPatch, add_unit
from .zimage_patch import SuiteZImagePatch, add_zimage_unit, check_vae, file_state_dict_from_host, is_zimage_model

NODE = "Apply ControlNet Patch (Suite)"
PATCH_KINDS = ("qwen_patch", "zimage_patch")
log = logging.getLogger(__name__)
_FROM_HOST: dict = {}  # id(host module) -> (module, our LoadedControl, patcher): one conversion per loaded patch


def _from_host_patch(patch):
    """ComfyUI's ModelPatchLoader output (a ModelPatcher around its own module) -> our model, read from its weights
    (a Z-Image `ZImage_Control`'s fused attention keys are split back into the file's, which our format reads)."""
    module = getattr(patch, "model", None)
    cached = _FROM_HOST.get(id(module))
    if cached is not None and cached[0] is module:
        return cached[1], cached[2]
    sd = module.state_dict()
    if "control_all_x_embedder.2-1.weight" in sd:
        sd = file_state_dict_from_host(sd)
    loaded = load_control(DictSource(sd, name=f"model patch {type(module).__name__}"))
    patcher = make_patcher(loaded.model)
    _FROM_HOST.clear()  # keep one: a new patch loaded replaces the old conversion
    _FROM_HOST[id(module)] = (module, loaded, patcher)
    return loaded, patcher


class ControlNetSuiteApplyPatch:
    DESCRIPTION = (
        "Applies a model-patch ControlNet (DiffSynth's blockwise Qwen-Image canny / depth / inpaint, or alibaba-pai's Z-Image "
        "Fun ControlNet union 1 / 2.0 / 2.1, whose 2.x also inpaints, with or without a condition image) to a MODEL, with the "
        "suite's strength, start/end, control mode and region mask. These ControlNets compute each block's control from the "
        "model's own hidden state, so they patch the MODEL (MODEL in, MODEL out) instead of travelling in the conditioning "
        "like a CONTROL_NET. Give it ComfyUI's ModelPatchLoader output ('patch'), or a file loaded by Load ControlNet (Suite).")
    CATEGORY = "conditioning/controlnet"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the ControlNet patch; connect it to the sampler. Chain several of these nodes to stack "
                       "patches: their controls add up, each computed from the same tokens.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The Qwen-Image or Z-Image model to steer (the one the patch was made for)."}),
                "vae": ("VAE", {"tooltip": "The model's VAE (Qwen-Image: its Wan 2.1 VAE; Z-Image: the Flux VAE): the condition image is read as a latent."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Multiplies every block's control; 0 turns the patch off exactly."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Fraction of the sampling schedule where the control starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Fraction of the sampling schedule where the control ends."}),
                "control_mode": (MODES, {"default": ControlMode.BALANCED.value, "tooltip": (
                    "balanced: every block alike, both branches. prompt / ControlNet is more important: early blocks weaker "
                    "(0.825^12 rising to 1); ControlNet is more important also leaves the negative branch unsteered. CFG "
                    "resolution weighting equals balanced here (one resolution).")}),
                "resize_mode": (RESIZE_MODES, {"default": ResizeMode.CROP.value, "tooltip": "How an image of another aspect ratio fits the latent."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": (
                    "The condition image (edges, depth ...), resized to the latent's size as resize_mode says. Needed by every "
                    "patch except a Z-Image Fun 2.x inpainting run, which may give only 'inpaint_image' (and 'inpaint_mask'): "
                    "its control input is then a grey image, as in ComfyUI's ZImageFunControlnet.")}),
                "patch": ("MODEL_PATCH", {"tooltip": "From ComfyUI's ModelPatchLoader (models/model_patches)."}),
                "control_net": ("CONTROL_NET", {"tooltip": "Or a model-patch file loaded by Load ControlNet (Suite)."}),
                "mask": ("MASK", {"tooltip": "Optional region mask: the control is multiplied by it per image token. None = everywhere."}),
                "inpaint_mask": ("MASK", {"tooltip": "Inpainting patches only: 1 where the image is to be painted (as ComfyUI's node takes it)."}),
                "inpaint_image": ("IMAGE", {"tooltip": (
                    "Z-Image Fun 2.x only: the image to inpaint (its inpaint_mask region is greyed out before it is read), "
                    "separate from the condition 'image'. None = a grey image, as ComfyUI's ZImageFunControlnet does. "
                    "DiffSynth's Qwen-Image inpaint patch reads 'image' instead.")}),
            },
        }

    def apply(self, model, vae, strength, start_percent, end_percent, control_mode, resize_mode, image=None, patch=None,
              control_net=None, mask=None, inpaint_mask=None, inpaint_image=None):
        for name, value in (("strength", strength), ("start_percent", start_percent), ("end_percent", end_percent)):
            if not math.isfinite(value):
                raise ControlNetError(f"{NODE}: {name} is {value}; it must be a finite number.")
        if start_percent > end_percent:
            raise ControlNetError(f"{NODE}: start_percent {start_percent} is after end_percent {end_percent}; the patch would never run.")
        if image is not None and (image.ndim != 4 or not bool(torch.isfinite(image).all())):
            raise ControlNetError(f"{NODE}: 'image' must be a finite IMAGE batch; got shape {tuple(image.shape)}.")
        for name, m in (("mask", mask), ("inpaint_mask", inpaint_mask)):
            if m is not None and (m.ndim not in (2, 3) or not bool(torch.isfinite(m).all())):
                raise ControlNetError(f"{NODE}: '{name}' must be a finite MASK (batch, height, width); got shape {tuple(m.shape)}.")
        if (patch is None) == (control_net is None):
            raise ControlNetError(f"{NODE}: connect exactly one of 'patch' (ComfyUI's ModelPatchLoader) and 'control_net' (Load ControlNet (Suite)).")
        if inpaint_image is not None and (inpaint_image.ndim != 4 or not bool(torch.isfinite(inpaint_image).all())):
            raise ControlNetError(f"{NODE}: 'inpaint_image' must be a finite IMAGE batch; got shape {tuple(inpaint_image.shape)}.")
        if control_net is not None:
            if not isinstance(control_net, SuiteControl) or control_net.is_foreign or control_net.backend.kind not in PATCH_KINDS:
                raise ControlNetError(f"{NODE}: '{getattr(control_net, 'name', type(control_net).__name__)}' is not a model-patch ControlNet; "
                                      "apply it with Apply ControlNet (Suite).")
            loaded, patcher, name = control_net.backend, control_net.patcher, control_net.name
        else:
            try:
                loaded, patcher = _from_host_patch(patch)
            except ControlNetError as e:
                raise ControlNetError(f"{NODE}: the connected model patch is not a ControlNet patch this suite runs ({e}).") from None
            name = "model patch"
        name = Path(str(name)).name
        zimage = loaded.kind == "zimage_patch"
        if zimage:
            _check_zimage(model, vae, loaded, name)
        elif type(model.model.diffusion_model).__module__.rsplit(".", 2)[-2:] != ["qwen_image", "model"]:
            raise IncompatibleModelError(f"{NODE}: {name} is a Qwen-Image ControlNet patch, but the model is {type(model.model).__name__}; "
                                         "connect a Qwen-Image model.")
        elif inpaint_image is not None:
            raise ControlNetError(f"{NODE}: 'inpaint_image' is read by Z-Image Fun 2.x patches only; {name} is a Qwen-Image patch, whose "
                                  "inpaint model reads 'image' (with 'inpaint_mask'). Disconnect 'inpaint_image'.")
        if image is None and not (zimage and loaded.model.config.inpainting and inpaint_image is not None):
            raise ControlNetError(f"{NODE}: no 'image' is connected. {name} needs a condition image" + (
                "; only a Z-Image Fun 2.x patch can run without one, and only as an inpainting run with 'inpaint_image' connected."
                if not (zimage and loaded.model.config.inpainting) else
                ", or, to inpaint without control, an 'inpaint_image' (with 'inpaint_mask' for the region to repaint)."))
        if mask is not None and mask.ndim == 2:
            mask = mask[None]
        keep = None if inpaint_mask is None else 1.0 - (inpaint_mask[None] if inpaint_mask.ndim == 2 else inpaint_mask)
        sampling = model.get_model_object("model_sampling")
        sigma_range = (float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent)))
        settings = dict(vae=vae, image=None if image is None else image[..., :3].movedim(-1, 1), strength=strength, sigma_range=sigma_range, mode=control_mode,
                        resize_mode=resize_mode, mask=mask, keep=keep, name=name)
        if not zimage:
            return (add_unit(model, SuiteBlockPatch(loaded, patcher, **settings)),)
        if not loaded.model.config.inpainting and (keep is not None or inpaint_image is not None):
            log.warning("%s: %s is a Z-Image Fun ControlNet 1 (no inpainting channels); 'inpaint_mask' / 'inpaint_image' are not used",
                        NODE, name)
        inpaint = None if inpaint_image is None else inpaint_image[..., :3].movedim(-1, 1)
        return (add_zimage_unit(model, SuiteZImagePatch(loaded, patcher, inpaint_image=inpaint, **settings)),)


def _check_zimage(model, vae, loaded, name: str) -> None:
    """Before sampling: a Z-Image base of the patch's width, and the Flux VAE."""
    if not is_zimage_model(model):
        raise IncompatibleModelError(f"{NODE}: {name} is a Z-Image Fun ControlNet patch, but the model is {type(model.model).__name__} "
                                     f"({type(model.model.diffusion_model).__name__}); connect a Z-Image model.")
    width, ours = model.model.diffusion_model.dim, loaded.model.config.dim
    if width != ours:
        raise IncompatibleModelError(f"{NODE}: {name} is {ours} wide, but the Z-Image model is {width} wide; use the patch made "
                                     "for this model.")
    check_vae(vae, NODE)
