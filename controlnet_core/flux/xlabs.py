"""The XLabs-AI layout of Flux ControlNets (x-flux canny / depth / hed v1-v3) and TheMistoAI's MistoLine, both under
Black Forest Labs' key names. Structured like the checkpoints, so every key names one parameter.

How it works: the condition *image* (not a latent) goes through a small conv encoder to 16 channels at the latent's
size, is packed 2x2 like the latent and projected by `pos_embed_input`, then added to the latent's tokens; a few Flux
double blocks follow, each with a linear output layer. Hosts cycle the outputs over the base's double blocks.

MistoLine differs in four ways: its encoder (`input_cond_block.encoder`) has ten convolutions (two of them 1x1)
instead of eight; it also has single blocks (`single_blocks`) with their own outputs (`single_controlnet_blocks`);
and every output layer is `Linear -> SiLU` (`controlnet_blocks.N.linear`). This class runs it as ComfyUI 0.3.75
does (`load_controlnet_flux_xlabs_mistoline`): the single blocks see [text, image] tokens and give outputs for the
image part, cycled over the base's single blocks. TheMistoAI's own node instead feeds the single blocks zeros in place
of the image tokens, takes outputs over the whole sequence and cycles over the first two only; that variant is not
implemented here.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import FluxControlNetBase
from .blocks_bfl import DoubleStreamBlock, MLPEmbedder, SingleStreamBlock, time_vector
from .config import TIME_FREQ_DIM, FluxControlNetConfig, check_buildable
from .injection import FluxControlOutput
from .layers import MISTOLINE_HINT_CONVS, XLABS_HINT_CONVS, conv_stack, pack


class _LinearSiLU(nn.Module):
    """MistoLine's output layer: a linear layer followed by SiLU (key `.linear`)."""

    def __init__(self, dim: int, **kw):
        super().__init__()
        self.linear = nn.Linear(dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.linear(x))


class _MistolineEncoder(nn.Module):
    """MistoLine's hint encoder, a conv stack stored under `input_cond_block.encoder`."""

    def __init__(self, **kw):
        super().__init__()
        self.encoder = conv_stack(MISTOLINE_HINT_CONVS, **kw)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class FluxXLabsControlNet(FluxControlNetBase):
    """XLabs / MistoLine Flux ControlNet. `forward(x, hint, timesteps, context, y, guidance)` returns a
    `FluxControlOutput` (with `cycle=True`)."""

    def __init__(self, config: FluxControlNetConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        check_buildable(config, ("xlabs", "mistoline"), type(self).__name__)
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        c, misto = cfg.hidden_size, cfg.layout == "mistoline"
        self.img_in = nn.Linear(cfg.in_channels, c, **kw)
        self.time_in = MLPEmbedder(TIME_FREQ_DIM, c, **kw)
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, c, **kw)
        self.guidance_in = MLPEmbedder(TIME_FREQ_DIM, c, **kw) if cfg.guidance_embeds else None
        self.txt_in = nn.Linear(cfg.joint_attention_dim, c, **kw)
        self.double_blocks = nn.ModuleList([
            DoubleStreamBlock(c, cfg.head_dim, cfg.mlp_hidden_dim, cfg.qkv_bias, **kw) for _ in range(cfg.num_layers)])
        self.single_blocks = nn.ModuleList([
            SingleStreamBlock(c, cfg.head_dim, cfg.mlp_hidden_dim, **kw) for _ in range(cfg.num_single_layers)])
        out_layer = (lambda: _LinearSiLU(c, **kw)) if misto else (lambda: nn.Linear(c, c, **kw))
        self.controlnet_blocks = nn.ModuleList([out_layer() for _ in range(cfg.num_layers)])
        self.single_controlnet_blocks = nn.ModuleList([out_layer() for _ in range(cfg.num_single_layers)])
        self.pos_embed_input = nn.Linear(cfg.hint_channels, c, **kw)
        if misto:
            self.input_cond_block = _MistolineEncoder(**kw)
        else:
            self.input_hint_block = conv_stack(XLABS_HINT_CONVS, **kw)

    def encode_hint(self, image: torch.Tensor) -> torch.Tensor:
        """Condition image (B, 3, 8H, 8W), values 0..1 -> (B, 16, H, W) features (the encoders were trained on -1..1)."""
        encoder = self.input_cond_block if self.config.layout == "mistoline" else self.input_hint_block
        return encoder(image * 2 - 1)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: Union[torch.Tensor, float],
        context: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        guidance: Union[torch.Tensor, float, None] = None,
    ) -> FluxControlOutput:
        """One control output per block.

        Args:
            x: noisy latent (B, 16, H, W), as the base model sees it.
            hint: the condition image, values 0..1, (B or 1, 3, 8H, 8W).
            timesteps: sigma, (B,) or a single value on 0..1.
            context: T5 text tokens (B, L, joint_attention_dim).
            y: pooled CLIP-L vector (B, pooled_projection_dim); None gives zeros.
            guidance: the distilled guidance scale, needed (and only read) when the file embeds it (`guidance_in`).
        """
        p = self.prepare(x, hint, timesteps, context, y, guidance)
        img = self.img_in(pack(x)) + self.pos_embed_input(pack(self.encode_hint(p.hint)))
        vec = time_vector(self.time_in, self.guidance_in, self.vector_in, p.timesteps, p.guidance, p.y)
        txt = self.txt_in(context)
        rope = self.rope(txt.shape[1], p.rows, p.cols, x.device)
        double = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, vec, rope)
            double.append(out(img))
        seq, n_txt = torch.cat([txt, img], dim=1), txt.shape[1]
        single = []
        for block, out in zip(self.single_blocks, self.single_controlnet_blocks):
            seq = block(seq, vec, rope)
            single.append(out(seq[:, n_txt:]))
        return FluxControlOutput(tuple(double), tuple(single), cycle=True)
