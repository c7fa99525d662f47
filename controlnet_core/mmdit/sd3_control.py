"""The SD3 / SD3.5 ControlNet of the diffusers layout (diffusers' `SD3ControlNetModel`: InstantX SD3 canny / pose /
tile, alimama SD3 inpainting), structured like its checkpoints so every key names one parameter.

How it works: a few MMDiT joint blocks of the base model's width see the noisy latent's tokens plus
`pos_embed_input(hint_latent)`, a zero-initialised patch projection of the *VAE-encoded* condition image (17 channels
for inpainting: the masked image's latent and a keep mask). After each block a zero-initialised linear layer
(`controlnet_blocks.N`) gives one control output; the base transformer adds those to its image tokens after its own
blocks, each output serving several consecutive base blocks (`base_block_sources`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ControlNetError
from .config import SD3ControlNetConfig
from .layers import JointTransformerBlock, PatchEmbed, TimeTextEmbedding

# The SD3 VAE's latent scale. ControlNet hints take the VAE latent times this, *without* subtracting the VAE's shift
# (0.0609): how InstantX trained them, and what ComfyUI and diffusers' ControlNet pipeline do.
HINT_LATENT_SCALE = 1.5305


def hint_latent_from_vae(latent: torch.Tensor) -> torch.Tensor:
    """The SD3 VAE's raw encoding of a condition image -> the `hint_latent` an SD3 ControlNet takes."""
    return latent * HINT_LATENT_SCALE


@dataclass(frozen=True)
class SD3ControlOutput:
    """What one forward pass gives.

    blocks: one tensor per ControlNet block, in block order, each (B, T, hidden_size) with T the number of image
        tokens, ceil(H / patch) * ceil(W / patch) for a latent of H x W. `blocks[i]` is `controlnet_blocks.i` applied
        to the image tokens after `transformer_blocks.i`; unscaled (multiply by the control strength).
    """

    blocks: tuple[torch.Tensor, ...]

    def host_output(self, base_depth: int) -> list[torch.Tensor]:
        """The list ComfyUI's MMDiT reads as `control["output"]` (see `host_output_list`)."""
        return host_output_list(self.blocks, base_depth)


def base_block_sources(num_control_blocks: int, base_depth: int) -> list[Optional[int]]:
    """For each of the base transformer's `base_depth` joint blocks, the index of the control output added to its
    image tokens after it, or None where nothing is added. ComfyUI's rule (`comfy/cldm/mmdit.py` and MMDiT's
    `forward_core_with_concat`):

    - every control output serves `interval = base_depth // num_control_blocks` consecutive base blocks, so base
      block k takes output `k // interval`;
    - the last control output serves one block fewer, so the base blocks from `num_control_blocks * interval - 1`
      on take nothing: with a divisor depth that is only the base's last block (its text stream ends there, and
      diffusers adds nothing to it either); otherwise the remainder blocks at the end go without;
    - a ControlNet deeper than the base (interval 0) adds nothing anywhere.

    In ComfyUI `base_depth` is the ControlNet's own `hidden_size // 64` (`SD3ControlNetConfig.base_depth`), which is
    the depth of the SD3 model of that width (SD3 medium: 24, SD3.5 large: 38).

    Diffusers' `SD3Transformer2DModel` agrees when `num_control_blocks` divides `base_depth` (InstantX: 6 or 12 over
    24); otherwise it spreads the outputs as `floor(k * num_control_blocks / base_depth)` over all but the last block.
    """
    if num_control_blocks < 1 or base_depth < 1:
        raise ControlNetError(f"need at least one control block and one base block, got {num_control_blocks} and {base_depth}")
    interval = base_depth // num_control_blocks
    used = max(num_control_blocks * interval - 1, 0)
    return [k // interval if k < used else None for k in range(base_depth)]


def host_output_list(blocks: Sequence[torch.Tensor], base_depth: int) -> list[torch.Tensor]:
    """The control outputs repeated as ComfyUI's MMDiT consumes them: entry k is added after base joint block k.

    The list is as long as ComfyUI's own SD3 ControlNet makes it (`len(blocks) * (base_depth // len(blocks)) - 1`,
    never negative) and repeats the same tensor objects, so `{"output": host_output_list(...)}` is the dict its
    `get_control` returns before the strength is applied."""
    sources = base_block_sources(len(blocks), base_depth)
    return [blocks[i] for i in sources if i is not None]


def append_keep_mask(latent: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The 17-channel hint of an inpainting ControlNet: the masked image's latent (B, 16, h, w) and a keep mask.

    keep: (B or 1, 1, h, w) at latent size, 1 where the image is kept and 0 where it is to be painted (ComfyUI's
        `ControlNetInpaintingAliMamaApply` passes `1 - mask`); None means keep everything, as ComfyUI does when an
        inpainting ControlNet is applied without a mask.
    """
    b, _, h, w = latent.shape
    if keep is None:
        keep = torch.ones(1, 1, h, w, dtype=latent.dtype, device=latent.device)
    if keep.ndim != 4 or keep.shape[1] != 1 or tuple(keep.shape[-2:]) != (h, w) or keep.shape[0] not in (1, b):
        raise ControlNetError(f"the keep mask has shape {list(keep.shape)}; expected [{b} or 1, 1, {h}, {w}] (the latent's size).")
    return torch.cat([latent, keep.to(latent).expand(b, -1, -1, -1)], dim=1)


class SD3ControlNet(nn.Module):
    """SD3-family ControlNet. `forward(x, hint_latent, timesteps, context, y)` returns `SD3ControlOutput`."""

    def __init__(self, config: SD3ControlNetConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        c = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg.in_channels, c, cfg.patch_size, cfg.pos_embed_max_size, **kw)
        self.time_text_embed = TimeTextEmbedding(c, cfg.pooled_projection_dim, **kw)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, c, **kw)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(c, cfg.mlp_hidden_dim, qk_norm=cfg.qk_norm, dual_attention=i in cfg.dual_attention_layers, **kw)
            for i in range(cfg.num_layers)
        ])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c, c, **kw) for _ in range(cfg.num_layers)])
        self.pos_embed_input = PatchEmbed(cfg.control_channels, c, cfg.patch_size, None, **kw)

    def _check_inputs(self, x, hint_latent, context, y, zero_pooled) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ControlNetError(f"x has shape {list(x.shape)}; expected [B, {cfg.in_channels}, H, W] (an SD3 latent).")
        b, _, h, w = x.shape
        if hint_latent.ndim != 4 or hint_latent.shape[1] != cfg.control_channels:
            fix = (" An inpainting ControlNet takes the masked image's latent and a keep mask: see append_keep_mask."
                   if cfg.extra_conditioning_channels else " The hint is the VAE-encoded condition image, not the image itself.")
            raise ControlNetError(f"hint_latent has shape {list(hint_latent.shape)}; expected [{b}, {cfg.control_channels}, {h}, {w}].{fix}")
        if tuple(hint_latent.shape[-2:]) != (h, w) or hint_latent.shape[0] not in (1, b):
            raise ControlNetError(f"hint_latent has shape {list(hint_latent.shape)}; expected [{b} or 1, {cfg.control_channels}, {h}, {w}] "
                                  "(the latent's size: resize the condition image to the output size before encoding it).")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
            raise ControlNetError(f"context has shape {list(context.shape)}; expected [{b}, tokens, {cfg.joint_attention_dim}].")
        if not zero_pooled and (y is None or y.shape != (b, cfg.pooled_projection_dim)):
            raise ControlNetError(f"y has shape {None if y is None else list(y.shape)}; expected [{b}, {cfg.pooled_projection_dim}].")

    def forward(
        self,
        x: torch.Tensor,
        hint_latent: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        zero_pooled: bool = True,
    ) -> SD3ControlOutput:
        """One control output per block.

        Args:
            x: noisy latent (B, in_channels, H, W), as the base model sees it.
            hint_latent: the condition image encoded by the SD3 VAE, times 1.5305 and *without* subtracting the VAE's
                shift 0.0609 (how InstantX trained; ComfyUI does this for every SD3 ControlNet, diffusers' ControlNet
                pipeline too, while its inpainting pipeline subtracts the shift), (B or 1, control_channels, H, W).
            timesteps: (B,) or a scalar, in 0..1000 (sigma x 1000, the SD3 base model's own timestep).
            context: text tokens (B, L, joint_attention_dim).
            y: pooled text vector (B, pooled_projection_dim); only read with `zero_pooled=False`.
            zero_pooled: replace `y` by zeros. True is how these ControlNets were trained and run: diffusers'
                `force_zeros_for_pooled_projection` (default True) and ComfyUI's SD3 ControlNet always zero it.

        Returns:
            `SD3ControlOutput`; `blocks[i]` is (B, T, hidden_size).
        """
        cfg = self.config
        self._check_inputs(x, hint_latent, context, y, zero_pooled)
        b = x.shape[0]
        if zero_pooled:
            y = torch.zeros(b, cfg.pooled_projection_dim, dtype=x.dtype, device=x.device)
        t = torch.as_tensor(timesteps, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(b)
        elif t.shape != (b,):
            raise ControlNetError(f"timesteps has shape {list(t.shape)}; expected [{b}] or a single value.")

        # 1. image tokens with positions, plus the projected hint
        h = self.pos_embed(x) + self.pos_embed_input(hint_latent)
        # 2. timestep + pooled text -> modulation vector; text tokens to the model's width
        emb = self.time_text_embed(t, y)
        ctx = self.context_embedder(context)
        # 3. the joint blocks, one control output after each
        outputs = []
        for block, out_proj in zip(self.transformer_blocks, self.controlnet_blocks):
            ctx, h = block(h, ctx, emb)
            outputs.append(out_proj(h))
        return SD3ControlOutput(tuple(outputs))
