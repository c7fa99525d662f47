"""The ldm UNet (SD1.x/SD2.x/SDXL) with ControlNet residual injection, named like its checkpoints.

Why the library has its own: training a ControlNet needs the locked base model's forward pass with the
residuals added where the paper adds them (skip connections and middle block; T2I features after input
blocks), without a UI host. Keys map one to one with `model.diffusion_model.*` of ldm checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ControlNetConfig, config_from_unet_like_state_dict
from .errors import CheckpointError
from .layers import Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, group_norm, timestep_embedding
from .loading import strict_fill
from .residuals import ControlResiduals


class Upsample(nn.Module):
    def __init__(self, channels: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


@dataclass(frozen=True)
class UNetConfig:
    encoder: ControlNetConfig  # the part the ControlNet copies (hint fields unused)
    out_channels: int = 4

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **kw) -> "UNetConfig":
        if "out.2.weight" not in sd:
            raise CheckpointError("UNet state dict without 'out.2.weight': not a full ldm UNet.")
        enc = config_from_unet_like_state_dict(sd, hint_channels=3, **kw)
        return cls(enc, tuple(sd["out.2.weight"].shape)[0])


def spatial_transformer(cfg: ControlNetConfig, ch: int, depth: int, **kw) -> SpatialTransformer:
    """The cross-attention transformer of a level `ch` wide, with the config's heads."""
    heads, dim_head = cfg.heads_for(ch)
    return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer, **kw)


def encoder_blocks(cfg: ControlNetConfig, **kw) -> Iterator[tuple[TimestepEmbedSequential, int]]:
    """The UNet's `input_blocks`, one at a time, each with the channels it outputs: the input conv, then per level its
    res blocks (each followed by a transformer where the level has them) and a downsample between levels.

    The one builder of the encoder, for the UNet and for the ControlNet's trainable copy of it (as diffusers'
    `get_down_block` serves both). Lazy, so a caller that builds something after each block (the ControlNet's zero
    convs) creates its layers in the order of the published code, and so draws the same random initial weights.
    """
    yield TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1, **kw)), cfg.model_channels
    ch = cfg.model_channels
    for level, ch_out in enumerate(cfg.level_channels):
        for _ in range(cfg.num_res_blocks[level]):
            layers: list[nn.Module] = [ResBlock(ch, cfg.emb_dim, ch_out, **kw)]
            ch = ch_out
            if cfg.transformer_depth[level] > 0:
                layers.append(spatial_transformer(cfg, ch, cfg.transformer_depth[level], **kw))
            yield TimestepEmbedSequential(*layers), ch
        if level != len(cfg.channel_mult) - 1:
            yield TimestepEmbedSequential(Downsample(ch, **kw)), ch


def middle_block(cfg: ControlNetConfig, ch: int, **kw) -> TimestepEmbedSequential:
    """ResBlock, then (unless `transformer_depth_middle` < 0) a transformer and a second ResBlock, all `ch` wide."""
    mid: list[nn.Module] = [ResBlock(ch, cfg.emb_dim, ch, **kw)]
    if cfg.transformer_depth_middle >= 0:
        mid += [spatial_transformer(cfg, ch, cfg.transformer_depth_middle, **kw), ResBlock(ch, cfg.emb_dim, ch, **kw)]
    return TimestepEmbedSequential(*mid)


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = config
        cfg = config.encoder
        kw = dict(dtype=dtype, device=device)
        mc, emb = cfg.model_channels, cfg.emb_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb, **kw), nn.SiLU(), nn.Linear(emb, emb, **kw))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb, **kw), nn.SiLU(), nn.Linear(emb, emb, **kw)))

        self.input_blocks = nn.ModuleList()
        chans = []  # the skip connections' widths, popped by the decoder
        for block, ch in encoder_blocks(cfg, **kw):
            self.input_blocks.append(block)
            chans.append(ch)
        self.middle_block = middle_block(cfg, ch, **kw)
        self.output_blocks = nn.ModuleList()
        for level, ch_out in reversed(list(enumerate(cfg.level_channels))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), emb, ch_out, **kw)]
                ch = ch_out
                if cfg.transformer_depth[level] > 0:
                    layers.append(spatial_transformer(cfg, ch, cfg.transformer_depth[level], **kw))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch, **kw))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch, **kw), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1, **kw))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor], y: Optional[torch.Tensor] = None,
                control: Optional[ControlResiduals] = None) -> torch.Tensor:
        """Noise (or v) prediction; `control` residuals are added at their sites (see ControlResiduals)."""
        cfg = self.config.encoder
        dtype = self.input_blocks[0][0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps.flatten(), cfg.model_channels).to(dtype))
        if cfg.adm_in_channels:
            emb = emb + self.label_emb(y.to(dtype))
        ctx = None if context is None else context.to(dtype)
        control = control or ControlResiduals()
        h, hs = x.to(dtype), []
        for k, block in enumerate(self.input_blocks):
            h = block(h, emb, ctx)
            if k < len(control.input) and control.input[k] is not None:
                h = h + control.input[k]
            hs.append(h)
        h = self.middle_block(h, emb, ctx)
        if control.mid is not None:
            h = h + control.mid
        for block in self.output_blocks:
            skip = hs.pop()
            k = len(hs)
            if k < len(control.down) and control.down[k] is not None:
                skip = skip + control.down[k]
            h = torch.cat([h, skip], dim=1)
            target = hs[-1].shape[-2:] if hs else None
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(h, emb)
                elif isinstance(layer, SpatialTransformer):
                    h = layer(h, ctx)
                else:
                    h = layer(h, tuple(target) if target is not None else None)
        return self.out(h)


def unet_from_state_dict(sd: Mapping[str, torch.Tensor], *, dtype: Optional[torch.dtype] = None, **kw) -> UNetModel:
    """Build and strictly load a UNet from bare ldm keys (strip `model.diffusion_model.` first)."""
    meta = {k: torch.empty(tuple(v.shape), device="meta") for k, v in sd.items()}
    cfg = UNetConfig.from_state_dict(meta, **kw)
    with torch.device("meta"):
        model = UNetModel(cfg, dtype=dtype)

    def mismatch(missing: list, unexpected: list, _wrong: list) -> str:
        return f"UNet weights do not fit the derived architecture: missing {missing[:5]}, unexpected {unexpected[:5]}."

    strict_fill(model, lambda k: sd[k].to(dtype) if dtype else sd[k], sd.keys(), "UNet weights", mismatch=mismatch, check_finite=False)
    return model.eval()


__all__ = ["UNetConfig", "UNetModel", "Upsample", "encoder_blocks", "middle_block", "spatial_transformer", "unet_from_state_dict"]
