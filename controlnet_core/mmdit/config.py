"""`SD3ControlNetConfig`: the architecture of a diffusers-layout SD3 / SD3.5 ControlNet (diffusers'
`SD3ControlNetModel`; InstantX SD3 canny / pose / tile, alimama SD3 inpainting).

Every field is read off tensor shapes by `controlnet_core.formats.sd3_keys.config_from_shapes`, so a scaled-down
file builds the same way as a published one. The one number the weights cannot show is the head width: the SD3
family always uses 64 channels per head (diffusers `attention_head_dim=64`; ComfyUI's MMDiT sets
`hidden_size = 64 * depth` and `num_heads = depth`), so `num_heads = hidden_size // 64`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ControlNetError

HEAD_DIM = 64  # channels per attention head in every SD3-family model
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep embedding fed to time_text_embed.timestep_embedder
QK_NORMS = (None, "rms_norm")  # the query/key normalisations SD3 (none) and SD3.5 (RMSNorm per head) use


@dataclass(frozen=True)
class SD3ControlNetConfig:
    """Architecture of an SD3-family ControlNet: a stack of MMDiT joint blocks fed `x + pos_embed_input(hint)`."""

    hidden_size: int = 1536  # token width (SD3 medium: 1536 = 24 heads x 64); also the base model's width
    num_layers: int = 12  # joint transformer blocks, each followed by a linear `controlnet_blocks.N`
    patch_size: int = 2  # latent pixels per token side
    in_channels: int = 16  # latent channels of `x` (SD3 VAE: 16)
    control_channels: int = 16  # channels of the hint latent: 16, or 17 for inpainting (latent + keep mask)
    pooled_projection_dim: int = 2048  # width of the pooled text vector `y` (CLIP-L + CLIP-G: 2048)
    joint_attention_dim: int = 4096  # width of the text tokens `context` (T5-XXL: 4096)
    pos_embed_max_size: int = 192  # side of the stored square grid of positional embeddings (cropped per size)
    mlp_hidden_dim: int = 6144  # inner width of every feed-forward (diffusers: 4 x hidden_size)
    qk_norm: Optional[str] = None  # "rms_norm": SD3.5 normalises queries and keys per head
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 medium: blocks with a second, image-only attention (`attn2`)

    def __post_init__(self) -> None:
        if isinstance(self.dual_attention_layers, list):
            object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        problems = self.problems()
        if problems:
            raise ControlNetError("impossible SD3ControlNetConfig: " + "; ".join(problems) + ".")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def base_depth(self) -> int:
        """Depth of the SD3 base model this ControlNet's width belongs to (ComfyUI: `depth = hidden_size // 64`).

        ComfyUI spreads the control outputs over that many base blocks; see `sd3_control.base_block_sources`."""
        return self.hidden_size // HEAD_DIM

    @property
    def extra_conditioning_channels(self) -> int:
        """Channels of the hint beyond the latent ones (diffusers' name): 1 for the inpainting mask, else 0."""
        return self.control_channels - self.in_channels

    def problems(self) -> list[str]:
        """Why these numbers describe no buildable model (empty when they do)."""
        out = []
        for name in ("hidden_size", "num_layers", "patch_size", "in_channels", "control_channels", "pooled_projection_dim",
                     "joint_attention_dim", "pos_embed_max_size", "mlp_hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name} = {value!r} is not a positive integer")
        if out:
            return out
        if self.hidden_size % HEAD_DIM:
            out.append(f"hidden_size = {self.hidden_size} is not a multiple of the SD3 head width {HEAD_DIM}")
        if self.control_channels < self.in_channels:
            out.append(f"control_channels = {self.control_channels} is fewer than in_channels = {self.in_channels}")
        if self.qk_norm not in QK_NORMS:
            out.append(f"qk_norm = {self.qk_norm!r} is not one of {QK_NORMS}")
        bad = [i for i in self.dual_attention_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            out.append(f"dual_attention_layers {bad} are not block indices 0..{self.num_layers - 1}")
        return out

    def summary(self) -> str:
        """One line for logs and error messages."""
        extras = [f"qk_norm {self.qk_norm}"] if self.qk_norm else []
        if self.dual_attention_layers:
            extras.append(f"dual attention in {len(self.dual_attention_layers)} blocks")
        if self.extra_conditioning_channels:
            extras.append(f"{self.control_channels}-channel inpainting hint")
        return (f"SD3 ControlNet: {self.num_layers} blocks of width {self.hidden_size} ({self.num_heads} heads), "
                f"patch {self.patch_size}" + "".join(", " + e for e in extras))
