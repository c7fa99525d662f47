"""ControlNet Union (Suite): the control types of a union ControlNet, and up to three conditions in one forward pass."""
from __future__ import annotations

import math

import torch

from ..controlnet_core import ControlNetError
from ..controlnet_core.union import UNION_TYPES, check_types
from .comfy_adapter import SuiteControl, UnionConditions

NODE = "ControlNet Union (Suite)"
EXTRA = 2  # conditions besides the apply node's image
TYPE_NAMES = list(UNION_TYPES)
# The modes of InstantX's and Shakker-Labs' Flux union files (canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low
# quality 6), under this node's type names where one means the same. ComfyUI's SetUnionControlNetType passes the SDXL
# index instead (its "depth" is the Flux file's "tile"); this node gives the file the mode its name says.
FLUX_MODES = {"canny/lineart/anime_lineart/mlsd": 0, "tile": 1, "depth": 2, "openpose": 4}


def _weight(name: str) -> tuple:
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": (
        f"Weight of {name} inside the fused condition. With several conditions it scales that condition and its "
        "token as the model's reference code does; with one it scales the residuals, like strength.")})


class ControlNetSuiteUnion:
    DESCRIPTION = (
        "Sets the control type of a union ControlNet (xinsir ControlNet++ / ProMax for SDXL) for the image given to the "
        "apply or stack node, and optionally adds up to two more (image, type) conditions. All of them go through the "
        "network in one forward pass, fused as the model was trained, which costs about one ControlNet instead of one "
        "per condition. 'auto' (no type) runs the file like ComfyUI's core does without SetUnionControlNetType. "
        "Flux union files (InstantX, Shakker-Labs) take one type: canny, tile, depth or openpose, given to the file as its "
        "own mode number.")
    CATEGORY = "conditioning/controlnet"
    RETURN_TYPES = ("CONTROL_NET",)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The union ControlNet with its conditions; connect it to Apply ControlNet (Suite) or a stack node.",)
    FUNCTION = "set_types"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in range(2, EXTRA + 2):
            optional[f"image_{i}"] = ("IMAGE", {"tooltip": f"Condition {i}: another condition image (pose, depth ...), resized like the first."})
            optional[f"type_{i}"] = (TYPE_NAMES, {"default": TYPE_NAMES[1 if i == 2 else 0], "tooltip": f"The control type of image_{i}."})
            optional[f"weight_{i}"] = _weight(f"image_{i}")
        return {
            "required": {
                "control_net": ("CONTROL_NET", {"tooltip": "A union ControlNet from Load ControlNet (Suite)."}),
                "type": (["auto"] + TYPE_NAMES, {"default": "canny/lineart/anime_lineart/mlsd", "tooltip": (
                    "The control type of the image connected to the apply or stack node. The 6-type file lacks tile and "
                    "repaint; ProMax has all 8.")}),
                "weight": _weight("the apply node's image"),
            },
            "optional": optional,
        }

    def set_types(self, control_net, type, weight, **extra):
        if not isinstance(control_net, SuiteControl) or control_net.is_foreign:
            raise ControlNetError(f"{NODE}: 'control_net' comes from another loader; load the union file with Load ControlNet (Suite). "
                                  "(For one type on ComfyUI's own loader, its SetUnionControlNetType node does the same.)")
        cfg = control_net.backend.config
        if getattr(cfg, "num_modes", 0):
            return (_flux_union(control_net, type, weight, extra),)
        if not getattr(cfg, "union_types", 0):
            what = cfg.family() if hasattr(cfg, "family") else cfg.summary()
            raise ControlNetError(f"{NODE}: {control_net.name} is not a union ControlNet ({what}); it has no control types. "
                                  "Connect it to the apply node directly.")
        pairs = [(extra[f"image_{i}"], extra.get(f"type_{i}", TYPE_NAMES[0]), extra.get(f"weight_{i}", 1.0))
                 for i in range(2, EXTRA + 2) if extra.get(f"image_{i}") is not None]
        for name, value in [("weight", weight)] + [(f"weight_{i + 2}", w) for i, (_, _, w) in enumerate(pairs)]:
            if not math.isfinite(value) or value < 0:
                raise ControlNetError(f"{NODE}: {name} is {value}; it must be a finite number from 0 to 2.")
        c = control_net.copy()
        if type == "auto":
            if pairs:
                raise ControlNetError(f"{NODE}: type is 'auto' but more images are connected; give the first image a type too.")
            c.union = None
            c.extra_args = {k: v for k, v in getattr(c, "extra_args", {}).items() if k != "control_type"}
            return (c,)
        types = (UNION_TYPES[type],) + tuple(UNION_TYPES[t] for _, t, _ in pairs)
        try:
            check_types(types, cfg.union_types, what=f"{NODE} ({control_net.name})")
        except ControlNetError as e:
            raise ControlNetError(str(e)) from None
        for img, _, _ in pairs:
            if img.ndim != 4 or img.shape[-1] not in (1, 2, 3, 4):
                raise ControlNetError(f"{NODE}: an extra image has shape {tuple(img.shape)}; expected an IMAGE batch (batch, height, width, channels).")
            if not bool(torch.isfinite(img).all()):
                raise ControlNetError(f"{NODE}: an extra image holds NaN or infinite values; check the node that made it.")
        c.union = UnionConditions(types, (weight,) + tuple(w for _, _, w in pairs), tuple(img for img, _, _ in pairs))
        return (c,)


def _flux_union(control_net: SuiteControl, type_: str, weight: float, extra: dict) -> SuiteControl:
    """A Flux union file: one mode, sent as its own mode number (see FLUX_MODES); the weight must be 1 (strength does that)."""
    modes = control_net.backend.config.num_modes
    if any(extra.get(f"image_{i}") is not None for i in range(2, EXTRA + 2)):
        raise ControlNetError(f"{NODE}: {control_net.name} is a Flux union ControlNet, which takes one condition per unit; "
                              "use a stack of units for several.")
    if weight != 1.0:
        raise ControlNetError(f"{NODE}: weight is {weight}, but a Flux union ControlNet has no condition weights; set the "
                              "unit's strength on the apply node instead.")
    c = control_net.copy()
    c.union = None
    c.extra_args = {k: v for k, v in getattr(c, "extra_args", {}).items() if k != "control_type"}
    if type_ == "auto":
        return c
    if type_ not in FLUX_MODES or FLUX_MODES[type_] >= modes:
        usable = [n for n, m in FLUX_MODES.items() if m < modes]
        raise ControlNetError(f"{NODE}: '{type_}' is not a mode of {control_net.name} (a Flux union ControlNet with {modes} modes); "
                              f"choose one of {usable} or 'auto'.")
    c.extra_args["control_type"] = [FLUX_MODES[type_]]
    return c
