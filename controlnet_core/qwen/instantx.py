"""The InstantX layout of Qwen-Image ControlNets (diffusers' `QwenImageControlNetModel`): InstantX canny / depth /
union and the inpainting ControlNet, structured like the checkpoints so every key names one parameter.

How it works: a few Qwen-Image blocks of the base model's width see the noisy latent's tokens plus
`controlnet_x_embedder(hint)`, a zero-initialised projection of the packed hint: the *VAE latent* of the condition
image, normalised as the base's own latents (`hint_latent_from_vae`), with a packed keep mask for inpainting
(68 features). After every block a zero-initialised linear layer gives one control output; the base transformer adds
each to the image tokens after a run of its own blocks (`controlnet_core.qwen.injection`).

The union file is this same layout: it has no control-type embedding, so nothing selects the type; the model reads
it off the condition image (canny, soft edge, depth or pose), and ComfyUI ignores a type set on it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..errors import ControlNetError
from ..flux.layers import Rope, pack, rope_tables
from ..mmdit.layers import RMSNorm
from .blocks import QwenImageBlock, TimeTextEmbedding, position_ids
from .config import PATCH, QwenControlNetConfig
from .injection import QwenControlOutput


def _four_d(t: torch.Tensor, name: str) -> torch.Tensor:
    """Qwen-Image latents are (B, C, 1, H, W) in ComfyUI (a one-frame video latent) and (B, C, H, W) elsewhere."""
    if t.ndim == 5:
        if t.shape[2] != 1:
            raise ControlNetError(f"{name} has shape {list(t.shape)}: {t.shape[2]} frames; Qwen-Image latents have one.")
        return t[:, :, 0]
    return t


def _per_sample(value, b: int, name: str, device) -> torch.Tensor:
    v = torch.as_tensor(value, device=device)
    if v.numel() == 1:
        return v.reshape(1).expand(b)
    if v.shape != (b,):
        raise ControlNetError(f"{name} has shape {list(v.shape)}; expected [{b}] or a single value.")
    return v


class QwenInstantXControlNet(nn.Module):
    """Qwen-Image ControlNet of the diffusers layout. `forward(x, hint_latent, timesteps, context)` returns a
    `QwenControlOutput`."""

    def __init__(self, config: QwenControlNetConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        c = cfg.hidden_size
        self.time_text_embed = TimeTextEmbedding(c, **kw)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, **kw)
        self.img_in = nn.Linear(cfg.in_channels, c, **kw)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, c, **kw)
        self.transformer_blocks = nn.ModuleList([QwenImageBlock(c, cfg.head_dim, cfg.mlp_hidden_dim, **kw) for _ in range(cfg.num_layers)])
        self.controlnet_blocks = nn.ModuleList([nn.Linear(c, c, **kw) for _ in range(cfg.num_layers)])
        self.controlnet_x_embedder = nn.Linear(cfg.hint_channels, c, **kw)

    def _hint_message(self) -> str:
        if self.config.extra_conditioning_channels:
            return ("An inpainting ControlNet takes the masked image's latent and a keep mask: see "
                    "controlnet_core.qwen.append_keep_mask.")
        return "The hint is the VAE-encoded condition image (see controlnet_core.qwen.hint_latent_from_vae), not the image."

    def _check(self, x: torch.Tensor, hint: torch.Tensor, context: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.latent_channels:
            raise ControlNetError(f"x has shape {list(x.shape)}; expected [B, {cfg.latent_channels}, H, W] or "
                                  f"[B, {cfg.latent_channels}, 1, H, W] (a Qwen-Image latent).")
        b, _, h, w = x.shape
        channels = cfg.hint_latent_channels
        if hint.ndim != 4 or hint.shape[1] != channels:
            raise ControlNetError(f"hint_latent has shape {list(hint.shape)}; expected [{b}, {channels}, {h}, {w}]. "
                                  + self._hint_message())
        if tuple(hint.shape[-2:]) != (h, w) or hint.shape[0] not in (1, b):
            raise ControlNetError(f"hint_latent has shape {list(hint.shape)}; expected [{b} or 1, {channels}, {h}, {w}] "
                                  "(the latent's size: resize the condition image to the output size first).")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
            raise ControlNetError(f"context has shape {list(context.shape)}; expected [{b}, tokens, {cfg.joint_attention_dim}] "
                                  "(the Qwen2.5-VL text encoder's hidden states).")

    def rope(self, text_tokens: int, rows: int, cols: int, device, diffusers_centre: bool = False) -> Rope:
        """cos / sin tables for [text tokens, image tokens] (`blocks.position_ids`)."""
        ids = position_ids(text_tokens, rows, cols, diffusers_centre=diffusers_centre, device=device)
        return rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        hint_latent: torch.Tensor,
        timesteps: Union[torch.Tensor, float],
        context: torch.Tensor,
        *,
        diffusers_centre: bool = False,
    ) -> QwenControlOutput:
        """One control output per block.

        Args:
            x: noisy latent (B, 16, H, W) or (B, 16, 1, H, W), as the base model sees it. Odd sizes are padded
                circularly to whole 2x2 tokens, as ComfyUI pads.
            hint_latent: (B or 1, C, H, W) (or with a frame axis of 1): the condition image's Qwen-Image latent,
                normalised as the base's own latents (`hint_latent_from_vae`), C = 16; inpainting files C = 17, that
                latent of the masked image plus a keep mask (`append_keep_mask`).
            timesteps: sigma, (B,) or a single value on 0..1 (x1000 inside, as the base does).
            context: text tokens (B, L, joint_attention_dim). No attention mask: ComfyUI runs its Qwen ControlNet
                without one.
            diffusers_centre: place the image tokens as diffusers does (`blocks.position_ids`); the default is
                ComfyUI's placement. They differ only for an odd number of token rows or columns.

        Returns:
            `QwenControlOutput`, one (B, ceil(H/2) * ceil(W/2), hidden) tensor per block.
        """
        x, hint_latent = _four_d(x, "x"), _four_d(hint_latent, "hint_latent")
        self._check(x, hint_latent, context)
        b, _, h, w = x.shape
        rows, cols = -(-h // PATCH), -(-w // PATCH)
        timesteps = _per_sample(timesteps, b, "timesteps", x.device)

        # 1. image tokens plus the projected hint; the text normalised and projected
        img = self.img_in(pack(x)) + self.controlnet_x_embedder(pack(hint_latent.expand(b, -1, -1, -1)))
        txt = self.txt_in(self.txt_norm(context))
        # 2. sigma -> modulation vector; rotary tables for [text, image]
        emb = self.time_text_embed(timesteps, img.dtype)
        rope = self.rope(txt.shape[1], rows, cols, x.device, diffusers_centre)
        # 3. the blocks, one output each from the image tokens (the last block's text stream is never read)
        outputs, last = [], len(self.transformer_blocks) - 1
        for i, (block, out) in enumerate(zip(self.transformer_blocks, self.controlnet_blocks)):
            img, txt = block(img, txt, emb, rope, text_out=i < last)
            outputs.append(out(img))
        return QwenControlOutput(tuple(outputs))
