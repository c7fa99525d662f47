"""`FluxControlNetConfig`: the architecture of a Flux.1 ControlNet, in any of the three published layouts.

Every number is read off tensor shapes by `controlnet_core.formats.flux_keys.config_from_shapes`, so a scaled-down
file builds the same way as a published one. Two things the weights cannot show:

- the rotary split of a head over the (index, row, column) position axes. Flux.1 uses (16, 56, 56) of its 128-wide
  heads, i.e. 1/8 for the index axis (always 0 for Flux.1, so it never rotates) and 7/16 each for rows and columns;
  `axes_dims_rope=()` means that split scaled to the head width (64 -> (8, 28, 28)), which is what the tests' tiny
  models use and what diffusers / ComfyUI must be given to agree;
- the patch: Flux packs 2x2 latent pixels into one token (in_channels 64 = 16 latent channels x 4), fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ControlNetError

PATCH = 2  # latent pixels per token side: Flux packs 2x2 pixels of its 16-channel latent into one 64-wide token
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep (and guidance) embedding
ROPE_THETA = 10_000
FLUX_AXES_DIMS = (16, 56, 56)  # Flux.1's rotary split of a 128-wide head over (index, row, column)
FLUX_HEAD_DIM = sum(FLUX_AXES_DIMS)
BASE_DOUBLE_BLOCKS = 19  # Flux.1 dev / schnell: double-stream blocks of the base transformer
BASE_SINGLE_BLOCKS = 38  # ... and single-stream blocks
HINT_ENCODER_CHANNELS = 16  # what every pixel-space hint encoder gives per latent pixel (packed: 64)

# "instantx": diffusers' FluxControlNetModel names (InstantX, Shakker-Labs union / Union Pro 2.0, alimama inpainting,
#   and diffusers' conversion of XLabs files, which adds a pixel-space `input_hint_block`).
# "xlabs": XLabs-AI's own layout, BFL names (`double_blocks`, `img_in`, ...) and a pixel-space `input_hint_block`.
# "mistoline": TheMistoAI's MistoLine, BFL names, its own hint encoder (`input_cond_block`), single blocks, and
#   `Linear -> SiLU` output layers.
LAYOUTS = ("instantx", "xlabs", "mistoline")


@dataclass(frozen=True)
class FluxControlNetConfig:
    """Architecture of a Flux ControlNet: a few Flux transformer blocks fed `x + hint projection`."""

    layout: str = "instantx"  # one of LAYOUTS: which key names the file uses, hence which model class builds it
    hidden_size: int = 3072  # token width; also the base model's (Flux.1: 24 heads x 128)
    head_dim: int = 128  # channels per attention head (the length of each query/key RMSNorm scale)
    num_layers: int = 19  # double-stream (image + text) blocks, each followed by an output layer
    num_single_layers: int = 38  # single-stream blocks after them, each followed by an output layer (may be 0)
    in_channels: int = 64  # width of a packed latent token: 16 latent channels x 2 x 2
    hint_channels: int = 64  # width of a packed hint token fed to the hint projection: 64, or 68 for inpainting
    hint_encoder_channels: int = 0  # 0: the hint is a latent; else a pixel-space conv encoder gives this many channels
    pooled_projection_dim: int = 768  # width of the pooled text vector `y` (CLIP-L)
    joint_attention_dim: int = 4096  # width of the text tokens `context` (T5-XXL)
    mlp_hidden_dim: int = 12288  # inner width of every feed-forward (4 x hidden_size)
    guidance_embeds: bool = False  # embeds the distilled guidance scale (Flux.1 dev); schnell-based ones do not
    num_modes: int = 0  # union ControlNets: size of the control-mode embedding (its token precedes the text)
    qkv_bias: bool = True  # BFL layouts: biases on the fused qkv projections (Flux.1 has them)
    axes_dims_rope: tuple[int, ...] = ()  # rotary split of a head; () = Flux.1's split scaled to head_dim
    rope_theta: int = ROPE_THETA

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if not self.axes_dims_rope and isinstance(self.head_dim, int) and self.head_dim > 0:
            object.__setattr__(self, "axes_dims_rope", scaled_axes_dims(self.head_dim))
        problems = self.problems()
        if problems:
            raise ControlNetError("impossible FluxControlNetConfig: " + "; ".join(problems) + ".")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent `x` (Flux.1: 16)."""
        return self.in_channels // (PATCH * PATCH)

    @property
    def pixel_hint(self) -> bool:
        """True when the hint is an image encoded by the model's own convolutions, False when it is a VAE latent.

        It also decides how ComfyUI and diffusers spread the outputs over the base blocks: cycled for image hints,
        repeated block-wise for latent hints (`controlnet_core.flux.injection`)."""
        return self.layout != "instantx" or self.hint_encoder_channels > 0

    @property
    def hint_latent_channels(self) -> int:
        """Channels of the unpacked latent hint: 16, or 17 for inpainting (latent + keep mask). 0 for image hints."""
        return 0 if self.pixel_hint else self.hint_channels // (PATCH * PATCH)

    @property
    def extra_conditioning_channels(self) -> int:
        """Unpacked hint channels beyond the latent's: 1 (the keep mask) for inpainting ControlNets, else 0."""
        return max(self.hint_latent_channels - self.latent_channels, 0)

    def problems(self) -> list[str]:
        """Why these numbers describe no buildable model (empty when they do)."""
        out = []
        if self.layout not in LAYOUTS:
            out.append(f"layout = {self.layout!r} is not one of {LAYOUTS}")
        for name in ("hidden_size", "head_dim", "num_layers", "in_channels", "hint_channels", "pooled_projection_dim",
                     "joint_attention_dim", "mlp_hidden_dim", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name} = {value!r} is not a positive integer")
        for name in ("num_single_layers", "hint_encoder_channels", "num_modes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                out.append(f"{name} = {value!r} is not a non-negative integer")
        if out:
            return out
        if self.hidden_size % self.head_dim:
            out.append(f"hidden_size = {self.hidden_size} is not a multiple of head_dim = {self.head_dim}")
        if self.in_channels % (PATCH * PATCH) or self.hint_channels % (PATCH * PATCH):
            out.append(f"in_channels = {self.in_channels} and hint_channels = {self.hint_channels} must be multiples of "
                       f"{PATCH * PATCH} (2x2 packed latent pixels)")
        if self.pixel_hint:
            encoder = self.hint_encoder_channels or HINT_ENCODER_CHANNELS
            if self.hint_channels != encoder * PATCH * PATCH:
                out.append(f"hint_channels = {self.hint_channels} is not the hint encoder's {encoder} channels x {PATCH * PATCH}")
            if self.layout != "instantx" and self.hint_encoder_channels not in (0, HINT_ENCODER_CHANNELS):
                out.append(f"the {self.layout} hint encoder gives {HINT_ENCODER_CHANNELS} channels, not {self.hint_encoder_channels}")
            if self.num_modes:
                out.append("control modes exist only for latent-hint (InstantX) union ControlNets")
        elif self.hint_channels < self.in_channels:
            out.append(f"hint_channels = {self.hint_channels} is fewer than in_channels = {self.in_channels}")
        if self.layout == "xlabs" and self.num_single_layers:
            out.append("XLabs ControlNets have double blocks only")
        if self.layout != "instantx" and self.num_modes:
            out.append(f"the {self.layout} layout has no control modes")
        axes = self.axes_dims_rope
        if sum(axes) != self.head_dim or any(not isinstance(a, int) or a < 0 or a % 2 for a in axes):
            out.append(f"axes_dims_rope = {axes} must be even sizes summing to head_dim = {self.head_dim}")
        return out

    def summary(self) -> str:
        """One line for logs and error messages."""
        extras = []
        if self.num_modes:
            extras.append(f"union of {self.num_modes} modes")
        if self.extra_conditioning_channels:
            extras.append(f"{self.hint_latent_channels}-channel inpainting hint")
        extras.append("image hint" if self.pixel_hint else "latent hint")
        extras.append("guidance embedding" if self.guidance_embeds else "no guidance embedding")
        return (f"Flux ControlNet ({self.layout}): {self.num_layers} double + {self.num_single_layers} single blocks of width "
                f"{self.hidden_size} ({self.num_heads} heads of {self.head_dim})" + "".join(", " + e for e in extras))


def scaled_axes_dims(head_dim: int) -> tuple[int, ...]:
    """Flux.1's rotary split (1/8, 7/16, 7/16 of the head) for another head width; () where it is not all even."""
    index = head_dim * FLUX_AXES_DIMS[0] // FLUX_HEAD_DIM
    rows = (head_dim - index) // 2
    axes = (index, rows, head_dim - index - rows)
    return axes if sum(axes) == head_dim and all(a % 2 == 0 for a in axes) else ()


def check_buildable(config: FluxControlNetConfig, layouts: tuple[str, ...], cls_name: str) -> None:
    """Refuse a config of a layout the class does not build, with the class to use instead."""
    if config.layout not in layouts:
        other = "FluxInstantXControlNet" if config.layout == "instantx" else "FluxXLabsControlNet"
        raise ControlNetError(f"{cls_name} builds the {'/'.join(layouts)} layout, not {config.layout!r}; use {other} "
                              "(or controlnet_core.flux.build_flux_controlnet).")
