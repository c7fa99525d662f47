"""The ldm `AutoencoderKL` (the SD1.x/SD2.x/SDXL VAE), named like `first_stage_model.*` keys.

Why here: training encodes every target image to latents (the encoder); validation images need the decoder.
The architecture is read from the shapes (base width, width per level, ResBlocks per level, latent channels,
attention inside levels), so scaled-down files load like full-size ones. Encoding returns the posterior mean
times the family's scale factor (0.18215 SD1.x/SD2.x, 0.13025 SDXL): deterministic, so a resumed run stays
bit-identical, and the SD VAEs' posterior standard deviation is tiny next to the mean anyway.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

SD_SCALE = 0.18215  # SD1.x and SD2.x latents (the ldm configs' scale_factor)
SDXL_SCALE = 0.13025  # SDXL's retrained VAE


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128  # width of level 0
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of level i = ch * ch_mult[i]; one 2x downsampling between levels
    num_res_blocks: int = 2  # per encoder level (the decoder has one more)
    z_channels: int = 4  # latent channels
    embed_dim: int = 4  # after quant_conv (equal to z_channels in every SD VAE)
    attn_levels: tuple[int, ...] = ()  # levels with attention after every ResBlock (none in SD VAEs)
    in_channels: int = 3
    out_channels: int = 3
    scale_factor: float = SD_SCALE

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(ch: int, **kw) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True, **kw)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.norm1 = _norm(cin, **kw)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, **kw)
        self.norm2 = _norm(cout, **kw)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, **kw)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, ch: int, **kw):
        super().__init__()
        self.norm = _norm(ch, **kw)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1, **kw) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # ldm pads right/bottom only, then strides


class Upsample(nn.Module):
    def __init__(self, ch: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, **kw):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch, **kw), AttnBlock(ch, **kw), ResnetBlock(ch, ch, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """`block` (ResnetBlocks), `attn` (after each block, when the level has attention), then `downsample`/`upsample`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, **kw):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **kw)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, m in enumerate(cfg.ch_mult):
            level, cout = _Level(), cfg.ch * m
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, **kw) for j in range(cfg.num_res_blocks))
            level.attn = nn.ModuleList(AttnBlock(cout, **kw) for _ in range(cfg.num_res_blocks) if i in cfg.attn_levels)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cout, **kw)
            self.down.append(level)
            cin = cout
        self.mid = _Mid(cin, **kw)
        self.norm_out = _norm(cin, **kw)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, **kw):
        super().__init__()
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1, **kw)
        self.mid = _Mid(cin, **kw)
        levels: list[nn.Module] = [nn.Module()] * len(cfg.ch_mult)
        for i in reversed(range(len(cfg.ch_mult))):  # `up.i` is level i; they run from the deepest up
            level, cout = _Level(), cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, **kw) for j in range(cfg.num_res_blocks + 1))
            level.attn = nn.ModuleList(AttnBlock(cout, **kw) for _ in range(cfg.num_res_blocks + 1) if i in cfg.attn_levels)
            if i != 0:
                level.upsample = Upsample(cout, **kw)
            levels[i] = level
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, **kw)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, **kw)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1, **kw)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior, unscaled: (B, embed_dim, H/8, W/8) each."""
        m = self.quant_conv(self.encoder(images))
        mean, logvar = m.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Calling the VAE encodes: it is the trainer's `encode_image` (a module, so caches can hash its weights)."""
        return self.encode(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8): the posterior mean x scale_factor."""
        dtype = self.quant_conv.weight.dtype
        return self.moments(images.to(dtype))[0] * self.config.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        dtype = self.post_quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(latents.to(dtype) / self.config.scale_factor))

    @staticmethod
    def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], *, scale_factor: float, source: str = "VAE") -> VAEConfig:
        """Architecture from the (unprefixed) ldm key shapes."""
        for need in ("encoder.conv_in.weight", "decoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight"):
            if need not in shapes:
                raise CheckpointError(f"{source}: no '{need}'; not an ldm AutoencoderKL (the SD VAE).")
        ch = shapes["encoder.conv_in.weight"][0]
        levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        if not levels:
            raise CheckpointError(f"{source}: no 'encoder.down.*' keys; not an ldm AutoencoderKL.")
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in levels)
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        attn = tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in shapes)
        return VAEConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks), z_channels=shapes["decoder.conv_in.weight"][1],
                         embed_dim=shapes["post_quant_conv.weight"][1], attn_levels=attn, in_channels=shapes["encoder.conv_in.weight"][1],
                         out_channels=shapes["decoder.conv_out.weight"][0], scale_factor=scale_factor)


__all__ = ["AutoencoderKL", "VAEConfig", "SD_SCALE", "SDXL_SCALE"]
