"""The InstantX / Shakker-Labs layout of Flux ControlNets (diffusers' `FluxControlNetModel`): InstantX canny / depth /
union, Shakker-Labs Union Pro and Union Pro 2.0, alimama inpainting, and diffusers' conversion of XLabs files.
Structured like the checkpoints, so every key names one parameter.

How it works: a few Flux blocks of the base model's width see the noisy latent's tokens plus
`controlnet_x_embedder(hint)`, a zero-initialised projection of the packed hint: the *VAE latent* of the condition
image (with a packed keep mask for inpainting: 68 features), or, for files with an `input_hint_block`, the condition
image itself through a small conv encoder. Union files embed a control mode as one extra token before the text.
After every double and single block a zero-initialised linear layer gives one control output; the base transformer
adds those to its image tokens (`controlnet_core.flux.injection`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..errors import ControlNetError
from .base import FluxControlNetBase
from .blocks_diffusers import DoubleBlock, SingleBlock, TimeTextEmbedding
from .config import FluxControlNetConfig, check_buildable
from .injection import FluxControlOutput
from .layers import ConditioningEmbedding, pack


class FluxInstantXControlNet(FluxControlNetBase):
    """Flux ControlNet of the diffusers layout. `forward(x, hint, timesteps, context, y, guidance, control_mode=None)`
    returns a `FluxControlOutput`."""

    def __init__(self, config: FluxControlNetConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        check_buildable(config, ("instantx",), type(self).__name__)
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        c = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.in_channels, c, **kw)
        self.controlnet_x_embedder = nn.Linear(cfg.hint_channels, c, **kw)
        self.input_hint_block = ConditioningEmbedding(cfg.hint_encoder_channels, **kw) if cfg.hint_encoder_channels else None
        self.time_text_embed = TimeTextEmbedding(c, cfg.pooled_projection_dim, cfg.guidance_embeds, **kw)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, c, **kw)
        self.controlnet_mode_embedder = nn.Embedding(cfg.num_modes, c, **kw) if cfg.num_modes else None
        self.transformer_blocks = nn.ModuleList([DoubleBlock(c, cfg.head_dim, cfg.mlp_hidden_dim, **kw) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([
            SingleBlock(c, cfg.head_dim, cfg.mlp_hidden_dim, **kw) for _ in range(cfg.num_single_layers)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c, c, **kw) for _ in range(cfg.num_layers)])
        self.controlnet_single_blocks = nn.ModuleList([nn.Linear(c, c, **kw) for _ in range(cfg.num_single_layers)])

    def _mode_token(self, control_mode, b: int, device) -> Optional[torch.Tensor]:
        """(B, 1, hidden) embedding of the control mode, or None for no mode token."""
        if control_mode is None:
            return None
        n = self.config.num_modes
        if not n:
            raise ControlNetError("this ControlNet is not a union one (no controlnet_mode_embedder): pass control_mode=None.")
        mode = torch.as_tensor(control_mode, device=device, dtype=torch.long).reshape(-1)
        if mode.numel() == 1:
            mode = mode.expand(b)
        if mode.shape != (b,) or int(mode.min()) < 0 or int(mode.max()) >= n:
            raise ControlNetError(f"control_mode {control_mode!r} must be one mode, or one per sample ({b}), each in 0..{n - 1}.")
        return self.controlnet_mode_embedder(mode)[:, None]

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: Union[torch.Tensor, float],
        context: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        guidance: Union[torch.Tensor, float, None] = None,
        *,
        control_mode: Union[int, torch.Tensor, None] = None,
    ) -> FluxControlOutput:
        """One control output per block.

        Args:
            x: noisy latent (B, 16, H, W), as the base model sees it.
            hint: (B or 1, C, H, W). Latent-hint files: the condition image's Flux latent, shifted and scaled as the
                base's own latents (`hint_latent_from_vae`), C = 16; inpainting files C = 17, that latent of the
                masked image plus a keep mask (`append_keep_mask`). Files with an `input_hint_block`: the condition
                image, values 0..1, (B or 1, 3, 8H, 8W).
            timesteps: sigma, (B,) or a single value on 0..1.
            context: T5 text tokens (B, L, joint_attention_dim).
            y: pooled CLIP-L vector (B, pooled_projection_dim); None gives zeros.
            guidance: the distilled guidance scale, needed (and only read) when the file embeds it.
            control_mode: union files: a mode index (or one per sample) whose embedding goes before the text tokens;
                None adds no mode token, as ComfyUI does when no type is set. diffusers always needs one.

        Returns:
            `FluxControlOutput` with `cycle` True only for image-hint files.
        """
        cfg = self.config
        p = self.prepare(x, hint, timesteps, context, y, guidance)
        mode = self._mode_token(control_mode, x.shape[0], x.device)

        # 1. image tokens plus the projected hint
        cond = p.hint if self.input_hint_block is None else self.input_hint_block(p.hint * 2 - 1)
        img = self.x_embedder(pack(x)) + self.controlnet_x_embedder(pack(cond))
        # 2. timestep (+ guidance) + pooled text -> modulation vector; text tokens, the mode token first
        emb = self.time_text_embed(p.timesteps, p.guidance, p.y)
        txt = self.context_embedder(context)
        if mode is not None:
            txt = torch.cat([mode.to(txt.dtype), txt], dim=1)
        rope = self.rope(txt.shape[1], p.rows, p.cols, x.device)
        # 3. double blocks, one output each
        double = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, emb, rope)
            double.append(out(img))
        # 4. single blocks over [text, image], one output each from the image part
        seq, n_txt = torch.cat([txt, img], dim=1), txt.shape[1]
        single = []
        for block, out in zip(self.single_transformer_blocks, self.controlnet_single_blocks):
            seq = block(seq, emb, rope)
            single.append(out(seq[:, n_txt:]))
        return FluxControlOutput(tuple(double), tuple(single), cycle=cfg.pixel_hint)
