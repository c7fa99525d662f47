"""`QwenControlNetConfig`: the architecture of a Qwen-Image ControlNet of the InstantX layout.

Every number is read off tensor shapes by `controlnet_core.formats.qwen_keys.config_from_shapes`, so a scaled-down
file builds the same way as a published one. Two things the weights cannot show:

- the rotary split of a head over the (frame, row, column) position axes. Qwen-Image uses (16, 56, 56) of its
  128-wide heads, the same split as Flux.1; `axes_dims_rope=()` means that split scaled to the head width
  (64 -> (8, 28, 28)), which is what the tests' tiny models use and what diffusers / ComfyUI must be given to agree;
- the patch: Qwen-Image packs 2x2 pixels of its 16-channel latent into one 64-wide token, fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ControlNetError
from ..flux.config import scaled_axes_dims

PATCH = 2  # latent pixels per token side
LATENT_CHANNELS = 16  # channels of the Qwen-Image (Wan 2.1) VAE latent
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep embedding
ROPE_THETA = 10_000
QWEN_AXES_DIMS = (16, 56, 56)  # Qwen-Image's rotary split of a 128-wide head over (frame, row, column)
BASE_BLOCKS = 60  # transformer blocks of the Qwen-Image base (and of Qwen-Image-Edit)


@dataclass(frozen=True)
class QwenControlNetConfig:
    """Architecture of a Qwen-Image ControlNet: a few Qwen-Image transformer blocks fed `x + hint projection`.

    The defaults are diffusers' `QwenImageControlNetModel` defaults (the base model's own sizes, 60 blocks); the
    published files have far fewer blocks.
    """

    hidden_size: int = 3072  # token width; also the base model's (24 heads x 128)
    head_dim: int = 128  # channels per attention head (the length of each query/key RMSNorm scale)
    num_layers: int = 60  # transformer blocks, each followed by an output layer
    in_channels: int = 64  # width of a packed latent token: 16 latent channels x 2 x 2
    hint_channels: int = 64  # width of a packed hint token: 64, or 68 for inpainting (latent + keep mask)
    joint_attention_dim: int = 3584  # width of the text tokens `context` (Qwen2.5-VL 7B hidden states)
    mlp_hidden_dim: int = 12288  # inner width of every feed-forward (4 x hidden_size)
    axes_dims_rope: tuple[int, ...] = ()  # rotary split of a head; () = Qwen-Image's split scaled to head_dim
    rope_theta: int = ROPE_THETA

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if not self.axes_dims_rope and isinstance(self.head_dim, int) and self.head_dim > 0:
            object.__setattr__(self, "axes_dims_rope", scaled_axes_dims(self.head_dim))
        problems = self.problems()
        if problems:
            raise ControlNetError("impossible QwenControlNetConfig: " + "; ".join(problems) + ".")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent `x` (Qwen-Image: 16)."""
        return self.in_channels // (PATCH * PATCH)

    @property
    def hint_latent_channels(self) -> int:
        """Channels of the unpacked latent hint: 16, or 17 for inpainting (the masked image's latent + a keep mask)."""
        return self.hint_channels // (PATCH * PATCH)

    @property
    def extra_conditioning_channels(self) -> int:
        """Unpacked hint channels beyond the latent's: 1 (the keep mask) for inpainting ControlNets, else 0."""
        return self.hint_latent_channels - self.latent_channels

    def problems(self) -> list[str]:
        """Why these numbers describe no buildable model (empty when they do)."""
        out = []
        for name in ("hidden_size", "head_dim", "num_layers", "in_channels", "hint_channels", "joint_attention_dim",
                     "mlp_hidden_dim", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name} = {value!r} is not a positive integer")
        if out:
            return out
        if self.hidden_size % self.head_dim:
            out.append(f"hidden_size = {self.hidden_size} is not a multiple of head_dim = {self.head_dim}")
        if self.in_channels % (PATCH * PATCH) or self.hint_channels % (PATCH * PATCH):
            out.append(f"in_channels = {self.in_channels} and hint_channels = {self.hint_channels} must be multiples of "
                       f"{PATCH * PATCH} (2x2 packed latent pixels)")
        elif self.hint_channels < self.in_channels:
            out.append(f"hint_channels = {self.hint_channels} is fewer than in_channels = {self.in_channels}")
        axes = self.axes_dims_rope
        if sum(axes) != self.head_dim or any(not isinstance(a, int) or a < 0 or a % 2 for a in axes):
            out.append(f"axes_dims_rope = {axes} must be even sizes summing to head_dim = {self.head_dim}")
        return out

    def summary(self) -> str:
        """One line for logs and error messages."""
        inpaint = f", {self.hint_latent_channels}-channel inpainting hint" if self.extra_conditioning_channels else ""
        return (f"Qwen-Image ControlNet (InstantX): {self.num_layers} blocks of width {self.hidden_size} "
                f"({self.num_heads} heads of {self.head_dim}), text width {self.joint_attention_dim}{inpaint}, latent hint")
