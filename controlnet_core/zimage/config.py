"""Sizes of a Z-Image Fun ControlNet (alibaba-pai "Z-Image-Turbo-Fun-Controlnet-Union"), read off a file's shapes.

Why every size comes from the file: the published files fix them (width 3840, 30 heads of 128, 6 or 15 control
layers), but a scaled-down file of the same layout (the tests' tiny ones, a distilled one) must load the same way.
The one size the file cannot tell is the base's depth (30 blocks in Z-Image-Turbo): which base block receives which
control layer depends on it, so it is an argument of `ZImageFunConfig.layer_places`, not a field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ControlNetError

LATENT_CHANNELS = 16  # the Flux VAE's latent, which Z-Image uses
PATCH = 2  # 2x2 latent pixels per token (the file's "2-1": patch 2, frame patch 1)
EMBEDDER_KEY = "2-1"
BASE_BLOCKS = 30  # Z-Image-Turbo's main transformer blocks
BASE_REFINER_BLOCKS = 2  # its noise-refiner blocks (before the main blocks, image tokens only)
ADALN_MAX = 256  # the base's timestep embedding width is min(width, 256)
NORM_EPS = 1e-5  # every RMSNorm of the control blocks, the per-head q/k norms included (diffusers' value)

# How the refiner-control outputs (versions 2.x) are made: by the file's own `control_noise_refiner` blocks (2.1),
# or, for the published 2.0 file whose refiner `after_proj` weights are all zeros, by the main `control_layers`
# (the workaround of ComfyUI's `broken` flag and of diffusers' `add_control_noise_refiner="control_layers"`).
REFINER_OWN = "control_noise_refiner"
REFINER_FROM_CONTROL_LAYERS = "control_layers"


@dataclass(frozen=True)
class ZImageFunConfig:
    """One Z-Image Fun ControlNet.

    `refiner_control` False is version 1: its two `control_noise_refiner` blocks are plain transformer blocks that
    refine the hint tokens before the control layers and feed no base block. True is versions 2.x: they are control
    blocks (before_proj / after_proj) whose outputs go to the base's two noise-refiner blocks; `refiner_source` says
    which blocks actually compute those outputs (see REFINER_OWN / REFINER_FROM_CONTROL_LAYERS).
    """

    dim: int = 3840
    head_dim: int = 128
    ffn_dim: int = 10240  # diffusers: int(dim / 3 * 8)
    adaln_dim: int = 256  # min(dim, 256): the base's timestep embedding
    hint_channels: int = LATENT_CHANNELS  # 16 (version 1) or 33 (2.x: 16 control latent + 1 keep mask + 16 inpaint latent)
    num_control_layers: int = 6
    num_refiner_layers: int = 2
    refiner_control: bool = False
    refiner_source: str = REFINER_OWN

    def __post_init__(self) -> None:
        for name in ("dim", "head_dim", "ffn_dim", "adaln_dim", "hint_channels", "num_control_layers", "num_refiner_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ControlNetError(f"impossible ZImageFunConfig: {name} = {value!r} is not a positive integer.")
        if self.dim % self.head_dim or self.head_dim % 2:
            raise ControlNetError(f"impossible ZImageFunConfig: width {self.dim} is not a whole number of heads of {self.head_dim} "
                                  "(an even head size, for the rotary embedding).")
        if self.adaln_dim != min(self.dim, ADALN_MAX):
            raise ControlNetError(f"impossible ZImageFunConfig: adaLN input width {self.adaln_dim}; Z-Image's timestep embedding "
                                  f"is min(width, {ADALN_MAX}) = {min(self.dim, ADALN_MAX)} wide.")
        if self.hint_channels < LATENT_CHANNELS:
            raise ControlNetError(f"impossible ZImageFunConfig: {self.hint_channels} hint channels; the hint starts with the "
                                  f"{LATENT_CHANNELS}-channel control latent.")
        if self.refiner_source not in (REFINER_OWN, REFINER_FROM_CONTROL_LAYERS):
            raise ControlNetError(f"impossible ZImageFunConfig: refiner_source {self.refiner_source!r}; expected "
                                  f"{REFINER_OWN!r} or {REFINER_FROM_CONTROL_LAYERS!r}.")
        if self.refiner_source == REFINER_FROM_CONTROL_LAYERS and not self.refiner_control:
            raise ControlNetError("impossible ZImageFunConfig: refiner outputs from the control layers need a version 2.x model "
                                  "(refiner_control=True).")
        if self.refiner_source == REFINER_FROM_CONTROL_LAYERS and self.num_control_layers < self.num_refiner_layers:
            raise ControlNetError(f"impossible ZImageFunConfig: {self.num_control_layers} control layers cannot stand in for "
                                  f"{self.num_refiner_layers} refiner-control layers.")

    @property
    def heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def inpainting(self) -> bool:
        """Versions 2.x take the inpainting channels (keep mask + inpaint latent) after the control latent."""
        return self.hint_channels > LATENT_CHANNELS

    def layer_stride(self, base_blocks: int = BASE_BLOCKS) -> int:
        """Base blocks between two control layers: round(30 / 6) = 5 (version 1), round(30 / 15) = 2 (2.x)."""
        return max(1, round(base_blocks / self.num_control_layers))

    def layer_places(self, base_blocks: int = BASE_BLOCKS) -> tuple[int, ...]:
        """The base block whose *output* control layer j's output is added to: j * stride, those inside the base
        (ComfyUI's `ZImageControlPatch` rule; diffusers' `control_layers_places` [0, 5, ..., 25] / [0, 2, ..., 28])."""
        stride = self.layer_stride(base_blocks)
        return tuple(j * stride for j in range(self.num_control_layers) if j * stride < base_blocks)

    def layer_for_block(self, block: int, base_blocks: int = BASE_BLOCKS) -> Optional[int]:
        """The control layer whose output base block `block` receives after it runs, or None."""
        places = self.layer_places(base_blocks)
        return places.index(block) if block in places else None

    def refiner_places(self) -> tuple[int, ...]:
        """The base noise-refiner blocks that receive a refiner-control output (after they run): (0, 1) for 2.x."""
        return tuple(range(self.num_refiner_layers)) if self.refiner_control else ()

    def summary(self) -> str:
        version = "2.x" if self.refiner_control else "1"
        refiner = ""
        if self.refiner_control:
            refiner = (f", {self.num_refiner_layers} refiner-control layers"
                       + (" (all-zero in the file: computed by the control layers)" if self.refiner_source == REFINER_FROM_CONTROL_LAYERS else ""))
        return (f"Z-Image Fun ControlNet (version {version}): {self.num_control_layers} control layers of width {self.dim} "
                f"({self.heads} heads){refiner}, {self.hint_channels}-channel hint")
