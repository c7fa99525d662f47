"""Timestep Keyframe (Suite) and Latent Keyframe (Suite): schedules for the apply and stack nodes' keyframe inputs.

Each node adds one keyframe to an optional `previous` chain and hands the result on; the schedule logic is
`controlnet_core.keyframes` (pure), the per-call lookup `comfy_adapter.SuiteControl`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..controlnet_core.keyframes import (
    INTERPOLATIONS,
    KeyframeError,
    LatentKeyframe,
    LatentKeyframes,
    TimestepKeyframe,
    TimestepKeyframes,
    parse_block_weights,
    parse_frames,
)

CATEGORY = "conditioning/controlnet/keyframes"
TIMESTEP_TYPE = "CNS_TIMESTEP_KEYFRAMES"
LATENT_TYPE = "CNS_LATENT_KEYFRAMES"


def _wrap(node: str, fn, *args, **kwargs):
    """Run a core constructor; its KeyframeError gets the node's name in front, as every error users see."""
    try:
        return fn(*args, **kwargs)
    except KeyframeError as e:
        raise KeyframeError(f"{node}: {e}") from None


def _previous(value, kind: type, node: str, source: str):
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise KeyframeError(f"{node}: 'previous' is a {type(value).__name__}; connect another '{source}' node or nothing.")
    return value


class ControlNetSuiteTimestepKeyframe:
    DESCRIPTION = ("One keyframe of a ControlNet's schedule: from start_percent on, the unit's strength is multiplied by this "
                   "strength, optionally with other block weights and a mask. Chain several through 'previous' and connect "
                   "the last to the 'timestep_keyframes' input of Apply ControlNet (Suite) or ControlNet Stack (Suite).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (TIMESTEP_TYPE,)
    RETURN_NAMES = ("timestep_keyframes",)
    FUNCTION = "add"
    NODE = "Timestep Keyframe (Suite)"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": (
                    "Where this keyframe takes effect: 0 = the first sampling step, 1 = the last (the scale of start/end "
                    "percent). Before the first keyframe the multiplier is 1. A keyframe at the percent of an earlier one "
                    "in the chain replaces it.")}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": (
                    "Multiplies the apply node's strength from start_percent on; 0 turns the unit off exactly for those steps.")}),
                "interpolation": (list(INTERPOLATIONS), {"default": "hold", "tooltip": (
                    "How the multiplier goes from this keyframe to the next one: hold (stays, then jumps), linear, "
                    "ease-in (slow start), ease-out (slow end), ease-in-out. The last keyframe holds to the end.")}),
                "block_weights": ("STRING", {"default": "", "tooltip": (
                    "Optional per-site weights replacing the control mode's from this keyframe on: comma-separated numbers, "
                    "one per skip connection then the middle block (SD1.5: 13, SDXL: 10). Empty = as the keyframe before "
                    "(or the mode's weights).")}),
                "inherit_missing": ("BOOLEAN", {"default": True, "tooltip": (
                    "On: empty block_weights and no mask keep those of the keyframe before. Off: they go back to the "
                    "control mode's weights and no keyframe mask.")}),
            },
            "optional": {
                "previous": (TIMESTEP_TYPE, {"tooltip": "Keyframes from another 'Timestep Keyframe (Suite)' node to add this one to."}),
                "mask": ("MASK", {"tooltip": (
                    "Optional mask from this keyframe on, multiplied with the apply node's own mask (resized to each "
                    "block's resolution). None = as the keyframe before (or everywhere).")}),
            },
        }

    def add(self, start_percent: float, strength: float, interpolation: str, block_weights: str, inherit_missing: bool,
            previous: Optional[TimestepKeyframes] = None, mask: Optional[torch.Tensor] = None) -> tuple[TimestepKeyframes]:
        chain = _previous(previous, TimestepKeyframes, self.NODE, self.NODE)
        weights = _wrap(self.NODE, parse_block_weights, block_weights)
        keyframe = _wrap(self.NODE, TimestepKeyframe, start_percent, strength, interpolation, weights, mask, bool(inherit_missing))
        return (chain.add(keyframe),)


class ControlNetSuiteLatentKeyframe:
    DESCRIPTION = ("Strength per frame of a latent batch (video frames, image batches): the named frames get strength, moving "
                   "to strength_end across them when interpolation is not hold; frames no keyframe names get default_strength. "
                   "Chain several through 'previous'; connect the last to the 'latent_keyframes' input of Apply ControlNet "
                   "(Suite) or ControlNet Stack (Suite).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT_TYPE,)
    RETURN_NAMES = ("latent_keyframes",)
    FUNCTION = "add"
    NODE = "Latent Keyframe (Suite)"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("STRING", {"default": "0", "tooltip": (
                    "Which frames (batch indices), Python-style, comma-separated: '0' the first, '-1' the last, '2:6' frames "
                    "2 to 5, '4:' from 4 on, '::2' every other one. A single index outside the batch stops sampling with "
                    "a message; a range is cut to the batch as Python does, and one that selects nothing is an error.")}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": (
                    "Multiplier of the control for these frames (the first of them, when interpolating); 0 leaves them "
                    "uncontrolled, exactly.")}),
                "strength_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": (
                    "The multiplier at the last frame named, when interpolation is not hold; the frames between move along "
                    "the curve. Unused with hold.")}),
                "interpolation": (list(INTERPOLATIONS), {"default": "hold", "tooltip": (
                    "hold: every named frame gets strength. linear / ease-in / ease-out / ease-in-out: from strength at the "
                    "first named frame to strength_end at the last, in the order named.")}),
                "default_strength": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": (
                    "Multiplier for frames no keyframe of the chain names (the last node's value counts). 0 = only the named "
                    "frames are controlled (as Advanced-ControlNet); 1 = the others at full strength.")}),
            },
            "optional": {
                "previous": (LATENT_TYPE, {"tooltip": (
                    "Keyframes from another 'Latent Keyframe (Suite)' node; where both name a frame, this node's strength wins.")}),
            },
        }

    def add(self, frames: str, strength: float, strength_end: float, interpolation: str, default_strength: float,
            previous: Optional[LatentKeyframes] = None) -> tuple[LatentKeyframes]:
        chain = _previous(previous, LatentKeyframes, self.NODE, self.NODE)
        specs = _wrap(self.NODE, parse_frames, frames)
        keyframe = _wrap(self.NODE, LatentKeyframe, specs, strength, strength_end, interpolation)
        return (_wrap(self.NODE, chain.add, keyframe, default_strength),)


NODE_CLASS_MAPPINGS = {"ControlNetSuiteTimestepKeyframe": ControlNetSuiteTimestepKeyframe,
                       "ControlNetSuiteLatentKeyframe": ControlNetSuiteLatentKeyframe}
NODE_DISPLAY_NAME_MAPPINGS = {"ControlNetSuiteTimestepKeyframe": "Timestep Keyframe (Suite)",
                              "ControlNetSuiteLatentKeyframe": "Latent Keyframe (Suite)"}
