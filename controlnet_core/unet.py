"""The ldm UNet (SD1.x/SD2.x/SDXL) with ControlNet residual injection, named like its checkpoints.

Why the library has its own: training a ControlNet needs the locked base model's forward pass with the
residuals added where the paper adds them (skip connections and middle block; T2I features after input
blocks), without a UI host. Keys map one to one with `model.diffusion_model.*` of ldm checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ControlNetConfig, config_from_unet_like_state_dict
from .errors import CheckpointError
from .layers import Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential, group_norm, timestep_embedding
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

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer, **kw)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1, **kw))])
        chans, ch = [mc], mc
        for level, ch_out in enumerate(cfg.level_channels):
            for _ in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb, ch_out, **kw)]
                ch = ch_out
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, **kw)))
                chans.append(ch)
        mid: list[nn.Module] = [ResBlock(ch, emb, ch, **kw)]
        if cfg.transformer_depth_middle >= 0:
            mid += [transformer(ch, cfg.transformer_depth_middle), ResBlock(ch, emb, ch, **kw)]
        self.middle_block = TimestepEmbedSequential(*mid)
        self.output_blocks = nn.ModuleList()
        for level, ch_out in reversed(list(enumerate(cfg.level_channels))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + chans.pop(), emb, ch_out, **kw)]
                ch = ch_out
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
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
    missing = sorted(set(model.state_dict()) - set(sd))
    unexpected = sorted(set(sd) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"UNet weights do not fit the derived architecture: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.load_state_dict({k: (v.to(dtype) if dtype else v) for k, v in sd.items()}, assign=True)
    return model.eval()


__all__ = ["UNetConfig", "UNetModel", "Upsample", "unet_from_state_dict"]
