"""Which control output each block of the Flux base transformer receives, as ComfyUI does it (and where diffusers
differs), and the output of a Flux ControlNet's forward pass.

ComfyUI (`comfy/ldm/flux/controlnet.py`, read in 0.3.75): the ControlNet returns `{"input": [...], "output": [...]}`,
lists as long as Flux.1's 19 double and 38 single blocks (hard-coded, whatever the base), and the base
(`comfy/ldm/flux/model.py`) adds `input[i]` to the image tokens after double block i and `output[i]` to the image part
of the sequence after single block i, for every i the list reaches. With n control outputs for 19 slots:

- latent-hint ControlNets (InstantX / Shakker / alimama) *repeat* each output `ceil(19 / n)` times in a row:
  slot k takes output `k // ceil(19 / n)`;
- image-hint ControlNets (XLabs, MistoLine) *cycle*: slot k takes output `k % n`;
- the single blocks the same way over 38 slots; no single outputs (XLabs, Union Pro 2.0) means an empty list.

diffusers (`FluxTransformer2DModel.forward`) uses the base's own block counts N and M instead of 19 and 38:
repeat gives block k output `k // ceil(N / n)`, cycle (`controlnet_blocks_repeat`, chosen by its pipelines for
ControlNets with an `input_hint_block`) gives `k % n`, and the single outputs are always repeated, never cycled.
So the two agree on every Flux.1 dev / schnell base (19 + 38) for repeat and for double-block cycling; they differ for
bases of other depths (ComfyUI adds nothing after block 19 / 38, and spreads for 19 / 38 blocks on shallower ones),
and for cycled single outputs (MistoLine; diffusers cannot load MistoLine files anyway).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ControlNetError
from .config import BASE_DOUBLE_BLOCKS, BASE_SINGLE_BLOCKS

COMFY_DOUBLE_SLOTS = BASE_DOUBLE_BLOCKS  # ComfyUI's `main_model_double`
COMFY_SINGLE_SLOTS = BASE_SINGLE_BLOCKS  # ComfyUI's `main_model_single`


def _check(num_outputs: int, base_blocks: int) -> None:
    if num_outputs < 0 or base_blocks < 0:
        raise ControlNetError(f"block counts must not be negative, got {num_outputs} outputs and {base_blocks} base blocks")


def host_sources(num_outputs: int, *, cycle: bool, slots: int) -> list[int]:
    """ComfyUI's control list as output indices: entry k is the output its slot k holds (`slots` = 19 or 38).

    Empty when there are no outputs (a ControlNet without single blocks)."""
    _check(num_outputs, slots)
    if num_outputs == 0:
        return []
    if cycle:
        return [k % num_outputs for k in range(slots)]
    run = math.ceil(slots / num_outputs)
    return [k // run for k in range(slots)]


def base_block_sources(num_outputs: int, base_blocks: int, *, cycle: bool, slots: int) -> list[Optional[int]]:
    """For each of the base's `base_blocks` blocks (double or single), the control output ComfyUI adds after it, or
    None: block k reads slot k of `host_sources`, and blocks past the list (k >= slots) get nothing."""
    _check(num_outputs, base_blocks)
    listed = host_sources(num_outputs, cycle=cycle, slots=slots)
    return [listed[k] if k < len(listed) else None for k in range(base_blocks)]


def flux_base_sources(num_double: int, num_single: int, base_double: int = BASE_DOUBLE_BLOCKS,
                      base_single: int = BASE_SINGLE_BLOCKS, *, cycle: bool) -> tuple[list[Optional[int]], list[Optional[int]]]:
    """ComfyUI's rule for a base of `base_double` + `base_single` blocks: (double-block sources, single-block sources)."""
    return (base_block_sources(num_double, base_double, cycle=cycle, slots=COMFY_DOUBLE_SLOTS),
            base_block_sources(num_single, base_single, cycle=cycle, slots=COMFY_SINGLE_SLOTS))


def diffusers_block_sources(num_outputs: int, base_blocks: int, *, cycle: bool) -> list[Optional[int]]:
    """diffusers' rule, for comparison: the spread uses the base's own block count (see the module docstring).
    Pass `cycle=False` for single blocks, which diffusers never cycles."""
    _check(num_outputs, base_blocks)
    if num_outputs == 0:
        return [None] * base_blocks
    if cycle:
        return [k % num_outputs for k in range(base_blocks)]
    interval = math.ceil(base_blocks / num_outputs)
    return [k // interval for k in range(base_blocks)]


@dataclass(frozen=True)
class FluxControlOutput:
    """What one forward pass of a Flux ControlNet gives, unscaled (multiply by the control strength).

    double: one (B, T, hidden) tensor per double block, in block order: its output layer applied to the image
        tokens after that block. T = ceil(H / 2) * ceil(W / 2) for a latent of H x W.
    single: the same for the single blocks, on the image part of their sequence (possibly empty).
    cycle: how hosts spread them over the base blocks: True (image-hint models) cycles, False repeats block-wise.
    """

    double: tuple[torch.Tensor, ...]
    single: tuple[torch.Tensor, ...]
    cycle: bool

    def host_control(self) -> dict[str, list[torch.Tensor]]:
        """The dict ComfyUI's Flux model reads (before the strength): `input` 19 entries for its double blocks,
        `output` 38 for its single blocks (empty without single outputs); entries are the same tensor objects."""
        return {
            "input": [self.double[i] for i in host_sources(len(self.double), cycle=self.cycle, slots=COMFY_DOUBLE_SLOTS)],
            "output": [self.single[i] for i in host_sources(len(self.single), cycle=self.cycle, slots=COMFY_SINGLE_SLOTS)],
        }

    def for_base(self, base_double: int = BASE_DOUBLE_BLOCKS, base_single: int = BASE_SINGLE_BLOCKS) -> tuple[list, list]:
        """Per base block (double, then single), the tensor ComfyUI adds after it, or None (`flux_base_sources`)."""
        double, single = flux_base_sources(len(self.double), len(self.single), base_double, base_single, cycle=self.cycle)
        return ([None if i is None else self.double[i] for i in double], [None if i is None else self.single[i] for i in single])
