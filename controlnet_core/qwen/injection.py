"""Which control output each block of the Qwen-Image base transformer receives, as ComfyUI does it (and where
diffusers differs), and the output of a Qwen-Image ControlNet's forward pass.

ComfyUI (`comfy/ldm/qwen_image/controlnet.py` and `model.py`, read in 0.3.75): the ControlNet returns
`{"input": [...]}`, a list of 60 entries (`main_model_double`, hard-coded whatever the base), in which each of its n
outputs is *repeated* `ceil(60 / n)` times in a row and the list is cut at 60: slot k holds output
`k // ceil(60 / n)`. The base adds `input[i]` to its image tokens after transformer block i, for every i the list
reaches (only to the first tokens, the latent's own; reference latents of Qwen-Image-Edit that follow get nothing).
So each output feeds a run of consecutive base blocks: with 5 outputs, blocks 0-11 take output 0, 12-23 output 1, ...

diffusers (`QwenImageTransformer2DModel.forward`) spreads over the base's own block count N instead of 60:
block k takes output `k // ceil(N / n)`. The two agree on every Qwen-Image base (60 blocks, also the Edit models) and
differ on bases of other depths: ComfyUI adds nothing after block 60, and on a shallower base uses only the first
N of its 60 slots (a 20-block base with 5 outputs receives outputs 0 and 1 only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ControlNetError
from .config import BASE_BLOCKS

COMFY_SLOTS = BASE_BLOCKS  # ComfyUI's `main_model_double`: the length of its control list


def _check(num_outputs: int, base_blocks: int) -> None:
    if num_outputs < 0 or base_blocks < 0:
        raise ControlNetError(f"block counts must not be negative, got {num_outputs} outputs and {base_blocks} base blocks")


def host_sources(num_outputs: int, slots: int = COMFY_SLOTS) -> list[int]:
    """ComfyUI's control list as output indices: entry k is the output its slot k holds. Empty without outputs."""
    _check(num_outputs, slots)
    if num_outputs == 0:
        return []
    run = math.ceil(slots / num_outputs)
    return [k // run for k in range(slots)]


def base_block_sources(num_outputs: int, base_blocks: int = BASE_BLOCKS) -> list[Optional[int]]:
    """ComfyUI's rule for a base of `base_blocks` transformer blocks: for each, the control output added after it,
    or None (block k reads slot k of `host_sources`; blocks past the 60 slots get nothing)."""
    _check(num_outputs, base_blocks)
    listed = host_sources(num_outputs)
    return [listed[k] if k < len(listed) else None for k in range(base_blocks)]


def diffusers_block_sources(num_outputs: int, base_blocks: int = BASE_BLOCKS) -> list[Optional[int]]:
    """diffusers' rule, for comparison: the runs are `ceil(base_blocks / num_outputs)` long (see the module docs)."""
    _check(num_outputs, base_blocks)
    if num_outputs == 0:
        return [None] * base_blocks
    interval = math.ceil(base_blocks / num_outputs)
    return [k // interval for k in range(base_blocks)]


@dataclass(frozen=True)
class QwenControlOutput:
    """What one forward pass of a Qwen-Image ControlNet gives, unscaled (multiply by the control strength).

    blocks: one (B, T, hidden) tensor per ControlNet block, in block order: `controlnet_blocks.i` applied to the image
        tokens after `transformer_blocks.i`. T = ceil(H / 2) * ceil(W / 2) for a latent of H x W.
    """

    blocks: tuple[torch.Tensor, ...]

    def host_control(self) -> dict[str, list[torch.Tensor]]:
        """The dict ComfyUI's Qwen-Image model reads (before the strength): `input`, 60 entries, the same tensor
        objects repeated block-wise (`host_sources`)."""
        return {"input": [self.blocks[i] for i in host_sources(len(self.blocks))]}

    def for_base(self, base_blocks: int = BASE_BLOCKS) -> list[Optional[torch.Tensor]]:
        """Per base block, the tensor ComfyUI adds after it, or None (`base_block_sources`)."""
        return [None if i is None else self.blocks[i] for i in base_block_sources(len(self.blocks), base_blocks)]
