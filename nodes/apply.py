"""Apply ControlNet (Suite), ControlNet Stack (Suite), Apply ControlNet Stack (Suite)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..controlnet_core import ControlMode, ControlNetError, ResizeMode
from ..controlnet_core.keyframes import LatentKeyframes, TimestepKeyframes
from .comfy_adapter import ControlBase, SuiteControl, needs_vae

MODES = [m.value for m in ControlMode]
RESIZE_MODES = [m.value for m in ResizeMode]

TIPS = {
    "positive": "Conditioning the control steers.",
    "negative": "Negative conditioning; it is steered too unless the mode is 'ControlNet is more important'.",
    "control_net": "A ControlNet or T2I-Adapter from a loader (this suite's or ComfyUI's own).",
    "image": "The condition image (edges, pose, depth ...), resized to the latent's size as resize_mode says.",
    "strength": "Multiplies every residual; 0 turns the unit off exactly.",
    "start_percent": "Fraction of the sampling schedule where the control starts.",
    "end_percent": "Fraction of the sampling schedule where the control ends.",
    "control_mode": ("balanced: control on both branches, equal weights. prompt is more important: weights 0.825^(12-i), "
                     "deeper blocks weaker. ControlNet is more important: same weights, conditional branch only, so CFG "
                     "amplifies the control. CFG resolution weighting: the paper's w_i = 64/h_i."),
    "resize_mode": "How a hint of another aspect ratio fits the latent: stretch, crop (cover, centred) or pad (fit, black borders).",
    "mask": ("Optional region mask: residuals are multiplied by it, resized to each block's resolution (for SD3-family "
             "models, to the grid of image tokens). None = everywhere."),
    "vae": ("The base model's VAE. Required by SD3 / SD3.5 ControlNets, which read the condition image as a latent; "
            "unused by UNet ControlNets and T2I-Adapters."),
    "stack": "Optional stack of units to add this one to.",
    "timestep_keyframes": ("Optional keyframes from 'Timestep Keyframe (Suite)' nodes: the strength (times this node's), block "
                           "weights and mask along the sampling schedule, within start/end. None = constant."),
    "latent_keyframes": ("Optional per-frame strengths from 'Latent Keyframe (Suite)' nodes, for latent batches (frames). "
                         "None = every frame at full strength."),
}


def tip(name: str, spec: tuple) -> tuple:
    opts = dict(spec[1]) if len(spec) > 1 else {}
    opts["tooltip"] = TIPS[name]
    return (spec[0], opts)


UNIT_INPUTS = {
    "control_net": ("CONTROL_NET",),
    "image": ("IMAGE",),
    "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
    "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
    "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
    "control_mode": (MODES, {"default": ControlMode.BALANCED.value}),
    "resize_mode": (RESIZE_MODES, {"default": ResizeMode.CROP.value}),
}


@dataclass(frozen=True)
class ControlUnit:
    """One entry of a CONTROL_NET_STACK."""

    control_net: object
    image: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    control_mode: str = ControlMode.BALANCED.value
    resize_mode: str = ResizeMode.CROP.value
    mask: Optional[torch.Tensor] = None
    timestep_keyframes: Optional[TimestepKeyframes] = None
    latent_keyframes: Optional[LatentKeyframes] = None


KEYFRAME_INPUTS = {  # optional inputs of the apply and stack nodes, last in their lists so saved workflows keep working
    "timestep_keyframes": ("CNS_TIMESTEP_KEYFRAMES",),
    "latent_keyframes": ("CNS_LATENT_KEYFRAMES",),
}


MODEL_PATCH_KINDS = ("qwen_patch", "zimage_patch")  # run inside the model's blocks: Apply ControlNet Patch (Suite)


def _check_unit(u: ControlUnit, node: str) -> None:
    if not isinstance(u.control_net, ControlBase):
        raise ControlNetError(f"{node}: 'control_net' is a {type(u.control_net).__name__}, not a ControlNet; connect a ControlNet loader.")
    if isinstance(u.control_net, SuiteControl) and not u.control_net.is_foreign and u.control_net.backend.kind in MODEL_PATCH_KINDS:
        raise ControlNetError(f"{node}: '{u.control_net.name}' is a model-patch ControlNet: it steers the model block by block, "
                              "so it goes through 'Apply ControlNet Patch (Suite)' (MODEL in, MODEL out), not the conditioning.")
    if u.image.ndim != 4 or u.image.shape[0] == 0:
        raise ControlNetError(f"{node}: 'image' must be an IMAGE batch (batch, height, width, channels); got shape {tuple(u.image.shape)}.")
    if u.image.shape[-1] not in (1, 2, 3, 4):
        raise ControlNetError(f"{node}: 'image' has {u.image.shape[-1]} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    # NaN passes ComfyUI's own min/max validation (every comparison with NaN is false) and would end as a black image
    # or an index error deep inside the sampler
    for name in ("strength", "start_percent", "end_percent"):
        value = getattr(u, name)
        if not math.isfinite(value):
            raise ControlNetError(f"{node}: {name} is {value}; it must be a finite number (strength 0 to 10, the percents 0 to 1).")
    if not bool(torch.isfinite(u.image).all()):
        raise ControlNetError(f"{node}: 'image' holds NaN or infinite values; check the node that made the hint.")
    if u.mask is not None and not bool(torch.isfinite(u.mask).all()):
        raise ControlNetError(f"{node}: 'mask' holds NaN or infinite values; a mask must be finite, 0 to 1.")
    if u.start_percent > u.end_percent:
        raise ControlNetError(f"{node}: start_percent {u.start_percent} is after end_percent {u.end_percent}; the unit would never run.")
    if u.mask is not None and (u.mask.ndim not in (2, 3) or 0 in u.mask.shape):
        raise ControlNetError(f"{node}: 'mask' must be (batch, height, width); got shape {tuple(u.mask.shape)}.")
    for name, kind, source in (("timestep_keyframes", TimestepKeyframes, "Timestep Keyframe (Suite)"),
                               ("latent_keyframes", LatentKeyframes, "Latent Keyframe (Suite)")):
        value = getattr(u, name)
        if value is not None and not isinstance(value, kind):
            raise ControlNetError(f"{node}: '{name}' is a {type(value).__name__}, not this suite's keyframes; connect a '{source}' node "
                                  "(other extensions' keyframe types are not read).")


def _control_for(u: ControlUnit, vae) -> SuiteControl:
    cn = u.control_net
    if isinstance(cn, SuiteControl):
        c = cn.copy()
        c.mode, c.resize_mode, c.mask = ControlMode.parse(u.control_mode), ResizeMode.parse(u.resize_mode), u.mask
    else:  # ComfyUI's own ControlNet / T2I-Adapter / control-LoRA object: wrap it, keep our modes and masks
        c = SuiteControl(cn, None, mode=u.control_mode, resize_mode=u.resize_mode, mask=u.mask, name=type(cn).__name__)
    c.timestep_keyframes, c.latent_keyframes = u.timestep_keyframes, u.latent_keyframes
    return c.set_cond_hint(u.image.movedim(-1, 1), u.strength, (u.start_percent, u.end_percent), vae=vae)


def apply_units(positive, negative, units: list[ControlUnit], vae=None, node: str = "Apply ControlNet (Suite)"):
    """Chain each unit onto every conditioning entry; positive and negative share one object per previous control."""
    for u in units:
        _check_unit(u, node)
        if vae is None and needs_vae(u.control_net):
            name = getattr(u.control_net, "name", type(u.control_net).__name__)
            raise ControlNetError(f"{node}: '{name}' is an SD3-family ControlNet: it reads the condition image through the model's "
                                  "VAE, and no VAE is connected. Connect the checkpoint loader's VAE output to this node's 'vae' input.")
    for u in units:
        if u.strength == 0:
            continue
        to_uncond = ControlMode.parse(u.control_mode).applies_to_uncond
        made: dict = {}
        out = []
        for conditioning, is_negative in ((positive, False), (negative, True)):
            new = []
            for t in conditioning:
                d = t[1].copy()
                if is_negative and not to_uncond:
                    new.append([t[0], d])  # the unconditional branch stays untouched
                    continue
                prev = d.get("control", None)
                if prev not in made:
                    made[prev] = _control_for(u, vae).set_previous_controlnet(prev)
                d["control"] = made[prev]
                d["control_apply_to_uncond"] = False
                new.append([t[0], d])
            out.append(new)
        positive, negative = out
    return positive, negative


class ControlNetSuiteApply:
    DESCRIPTION = ("Applies a ControlNet (any loader's) to positive and negative conditioning, with strength, start/end, "
                   "control mode, optional region mask and resize mode. The family of the ControlNet is checked against "
                   "the model before sampling starts.")
    CATEGORY = "conditioning/controlnet"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        req = {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), **UNIT_INPUTS}
        return {
            "required": {k: tip(k, v) for k, v in req.items()},
            "optional": {"mask": tip("mask", ("MASK",)), "vae": tip("vae", ("VAE",)), **{k: tip(k, v) for k, v in KEYFRAME_INPUTS.items()}},
        }

    def apply(self, positive, negative, control_net, image, strength, start_percent, end_percent, control_mode, resize_mode, mask=None, vae=None,
              timestep_keyframes=None, latent_keyframes=None):
        unit = ControlUnit(control_net, image, strength, start_percent, end_percent, control_mode, resize_mode, mask,
                           timestep_keyframes, latent_keyframes)
        return apply_units(positive, negative, [unit], vae, "Apply ControlNet (Suite)")


class ControlNetSuiteStack:
    DESCRIPTION = "Adds one ControlNet unit to a stack; chain several and apply them together with 'Apply ControlNet Stack (Suite)'."
    CATEGORY = "conditioning/controlnet"
    RETURN_TYPES = ("CONTROL_NET_STACK",)
    RETURN_NAMES = ("stack",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {k: tip(k, v) for k, v in UNIT_INPUTS.items()},
            "optional": {"mask": tip("mask", ("MASK",)), "stack": tip("stack", ("CONTROL_NET_STACK",)),
                         **{k: tip(k, v) for k, v in KEYFRAME_INPUTS.items()}},
        }

    def add(self, control_net, image, strength, start_percent, end_percent, control_mode, resize_mode, mask=None, stack=None,
            timestep_keyframes=None, latent_keyframes=None):
        unit = ControlUnit(control_net, image, strength, start_percent, end_percent, control_mode, resize_mode, mask,
                           timestep_keyframes, latent_keyframes)
        _check_unit(unit, "ControlNet Stack (Suite)")
        return (tuple(stack or ()) + (unit,),)


class ControlNetSuiteApplyStack:
    DESCRIPTION = "Applies every unit of a ControlNet stack; their residuals add up, as the paper composes several ControlNets."
    CATEGORY = "conditioning/controlnet"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"positive": tip("positive", ("CONDITIONING",)), "negative": tip("negative", ("CONDITIONING",)),
                         "stack": ("CONTROL_NET_STACK", {"tooltip": "Units from 'ControlNet Stack (Suite)' nodes."})},
            "optional": {"vae": tip("vae", ("VAE",))},
        }

    def apply(self, positive, negative, stack, vae=None):
        return apply_units(positive, negative, list(stack), vae, "Apply ControlNet Stack (Suite)")
