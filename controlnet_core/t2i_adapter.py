"""T2I-Adapter (full and light), with the original TencentARC key names.

Adapters add features to the UNet's hidden state after selected input blocks instead of to the
skip connections; they are exposed through the same `ControlResiduals` (its `input` and, for
SDXL, `mid` sites). Their output does not depend on the timestep, so it is computed once per hint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import count_numbered
from .errors import ControlNetError
from .model import tensor_version
from .residuals import ControlResiduals


@dataclass(frozen=True)
class T2IAdapterConfig:
    light: bool = False  # Adapter_light (colour) instead of the full Adapter
    cin: int = 192  # channels after pixel-unshuffle: hint_channels * unshuffle**2
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    nums_rb: int = 2  # residual blocks per level
    ksize: int = 1  # kernel of block2 / in_conv / skep (full adapter)
    use_conv: bool = False  # strided-conv downsampling (else average pooling)
    xl: bool = False  # SDXL layout: unshuffle 16, features after input blocks 3, 5, 8 and the middle block

    def __post_init__(self) -> None:
        """Refuse impossible adapters at construction (they come from a file's shapes, which may be damaged)."""
        problems = []
        if self.cin < 1 or self.cin % self.unshuffle**2:
            problems.append(f"cin = {self.cin} is not a positive multiple of {self.unshuffle**2} (pixel-unshuffle {self.unshuffle})")
        if not self.channels or min(self.channels) < (1 if self.light else 4):
            problems.append(f"channels = {self.channels}")
        if self.nums_rb < 1 or self.ksize < 1 or self.ksize % 2 == 0:
            problems.append(f"nums_rb = {self.nums_rb}, ksize = {self.ksize} (need >= 1, and an odd kernel)")
        if problems:
            raise ControlNetError("impossible T2IAdapterConfig: " + "; ".join(problems) + ".")

    @property
    def unshuffle(self) -> int:
        return 16 if self.xl else 8

    @property
    def hint_channels(self) -> int:
        return self.cin // (self.unshuffle**2)

    def feature_sites(self) -> list[int]:
        """Input-block index receiving each level's feature; -1 means the middle block."""
        if self.xl:
            return [3, 5, 8, -1]
        return [3 * i + 2 for i in range(len(self.channels))]


class _Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, **kw):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:
            return self.op(x)
        # odd sizes round up, as the reference implementation pads them
        return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class ResnetBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, down: bool, ksize: int, use_conv: bool, **kw):
        super().__init__()
        ps = ksize // 2
        self.in_conv = nn.Conv2d(in_c, out_c, ksize, 1, ps, **kw) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, 1, 1, **kw)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_c, out_c, ksize, 1, ps, **kw)
        self.down = down
        if down:
            self.down_opt = _Downsample(in_c, use_conv, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class ResnetBlockLight(nn.Module):
    def __init__(self, c: int, **kw):
        super().__init__()
        self.block1 = nn.Conv2d(c, c, 3, 1, 1, **kw)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(c, c, 3, 1, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class ExtractorBlock(nn.Module):
    def __init__(self, in_c: int, inter_c: int, out_c: int, nums_rb: int, down: bool, **kw):
        super().__init__()
        self.in_conv = nn.Conv2d(in_c, inter_c, 1, 1, 0, **kw)
        self.body = nn.Sequential(*[ResnetBlockLight(inter_c, **kw) for _ in range(nums_rb)])
        self.out_conv = nn.Conv2d(inter_c, out_c, 1, 1, 0, **kw)
        self.down = down
        if down:
            self.down_opt = _Downsample(in_c, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(nn.Module):
    def __init__(self, config: T2IAdapterConfig, *, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        ch = cfg.channels
        if cfg.light:
            self.body = nn.ModuleList(
                ExtractorBlock(cfg.cin if i == 0 else ch[i - 1], ch[i] // 4, ch[i], cfg.nums_rb, down=i > 0, **kw) for i in range(len(ch))
            )
        else:
            down_levels = {2} if cfg.xl else set(range(1, len(ch)))
            blocks = []
            for i in range(len(ch)):
                for j in range(cfg.nums_rb):
                    in_c = ch[i - 1] if (j == 0 and i > 0) else ch[i]
                    blocks.append(ResnetBlock(in_c, ch[i], j == 0 and i in down_levels, cfg.ksize, cfg.use_conv, **kw))
            self.body = nn.ModuleList(blocks)
            self.conv_in = nn.Conv2d(cfg.cin, ch[0], 3, 1, 1, **kw)
        self._cache: Optional[tuple] = None

    def features(self, hint: torch.Tensor) -> list[torch.Tensor]:
        cfg = self.config
        u = cfg.unshuffle
        if hint.shape[-1] % u or hint.shape[-2] % u:
            raise ControlNetError(f"T2I-Adapter hint of {tuple(hint.shape[-2:])} px: height and width must be multiples of {u}.")
        if hint.shape[1] != cfg.hint_channels:
            if cfg.hint_channels == 1:
                hint = hint.mean(1, keepdim=True)  # sketch/canny adapters take one channel
            else:
                raise ControlNetError(f"T2I-Adapter expects a {cfg.hint_channels}-channel hint; got {hint.shape[1]} channels.")
        x = F.pixel_unshuffle(hint, u)
        feats = []
        if cfg.light:
            for block in self.body:
                x = block(x)
                feats.append(x)
        else:
            x = self.conv_in(x)
            for i in range(len(cfg.channels)):
                for j in range(cfg.nums_rb):
                    x = self.body[i * cfg.nums_rb + j](x)
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps=None, context=None, y=None) -> ControlResiduals:
        """Features for the UNet's input side. x only gives the batch size, dtype and device."""
        param = next(self.parameters())
        key = (id(hint), tensor_version(hint), tuple(hint.shape), param.dtype, param.device)
        if self._cache is not None and self._cache[0] is hint and self._cache[1] == key:
            feats = self._cache[2]
        else:
            feats = self.features(hint.to(device=param.device, dtype=param.dtype))
            self._cache = (hint, key, feats)
        b = x.shape[0]
        if feats[0].shape[0] != b:
            if b % feats[0].shape[0]:
                raise ControlNetError(f"hint batch {feats[0].shape[0]} does not divide latent batch {b}.")
            feats = [f.repeat(b // f.shape[0], 1, 1, 1) for f in feats]
        sites = self.config.feature_sites()
        n_inputs = max(s for s in sites) + 1
        inputs: list[Optional[torch.Tensor]] = [None] * n_inputs
        mid = None
        for site, f in zip(sites, feats):
            if site < 0:
                mid = f
            else:
                inputs[site] = f
        return ControlResiduals(down=(), mid=mid, input=tuple(inputs))

    def clear_hint_cache(self) -> None:
        self._cache = None


def config_from_t2i_shapes(shapes: Mapping[str, tuple[int, ...]]) -> T2IAdapterConfig:
    """Derive the adapter's config from canonical (original-layout) key shapes."""
    keys = set(shapes)
    body_idx = [int(m[1]) for k in keys if (m := re.match(r"body\.(\d+)\.", k))]
    if not body_idx:
        raise ControlNetError("T2I-Adapter state dict has no 'body.*' keys.")
    if "conv_in.weight" not in keys:  # light adapter: body.i.{in_conv, body.j, out_conv}
        levels = count_numbered(body_idx, "body blocks", "T2I-Adapter")
        nums_rb = count_numbered((int(m[1]) for k in keys if (m := re.match(r"body\.0\.body\.(\d+)\.", k))), "body.0 blocks", "T2I-Adapter")
        chans = tuple(shapes[f"body.{i}.out_conv.weight"][0] for i in range(levels))
        return T2IAdapterConfig(light=True, cin=shapes["body.0.in_conv.weight"][1], channels=chans, nums_rb=nums_rb, ksize=3)
    cin = shapes["conv_in.weight"][1]
    n_body = count_numbered(body_idx, "body blocks", "T2I-Adapter")
    nums_rb = 2  # every published full adapter; ComfyUI and diffusers assume it too
    if n_body % nums_rb:
        raise ControlNetError(f"T2I-Adapter with {n_body} body blocks: expected {nums_rb} per level.")
    chans = tuple(shapes[f"body.{i * nums_rb}.block1.weight"][0] for i in range(n_body // nums_rb))
    return T2IAdapterConfig(
        light=False,
        cin=cin,
        channels=chans,
        nums_rb=nums_rb,
        ksize=shapes["body.0.block2.weight"][2],
        use_conv=any(k.endswith("down_opt.op.weight") for k in keys),
        xl=cin % 256 == 0,  # unshuffle 16 (SDXL) gives 256 per hint channel, unshuffle 8 gives 64
    )
