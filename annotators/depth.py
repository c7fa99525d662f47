"""Depth-Anything V2 (Small): relative depth from one RGB image, for depth ControlNets.

The network is DINOv2 ViT-S/14 + a DPT head (Yang et al. 2024, https://arxiv.org/abs/2406.09414),
rewritten in plain torch with the module names of the official checkpoint
(`depth_anything_v2_vits.pth`: `pretrained.*` backbone, `depth_head.*` decoder), so the published
file loads strictly without any key mapping. Only the Small checkpoint is registered: it is the one
released under Apache-2.0 (Base/Large/Giant are CC-BY-NC-4.0).

Pipeline, as the reference `DepthAnythingV2.infer_image` (and comfyui_controlnet_aux) does it:
RGB in [0, 1] -> bicubic resize so the short side is `resolution` (multiple of 14, lower bound) ->
ImageNet mean/std -> network -> disparity (near = large) -> bilinear back to the input size ->
min-max per image -> grey map repeated to 3 channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnnotatorError, SingleNetworkAnnotator
from .registry import AnnotatorInfo, Published, register, resolution_param

FILENAME = "depth_anything_v2_vits.pth"
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DepthAnythingV2Config:
    """Architecture of one Depth-Anything V2 size; the defaults are the Small (vits) checkpoint."""

    embed_dim: int = 384  # ViT width (vitb 768, vitl 1024)
    depth: int = 12  # transformer blocks
    num_heads: int = 6
    mlp_ratio: int = 4
    pos_grid: int = 37  # the position embedding is trained for 518 / 14 = 37 patches per side
    taps: tuple[int, ...] = (2, 5, 8, 11)  # blocks whose (normed) tokens feed the DPT head
    features: int = 64  # DPT fusion width
    out_channels: tuple[int, ...] = (48, 96, 192, 384)  # DPT reassemble widths
    head_hidden: int = 32  # width of the last head convolution


# ---------------------------------------------------------------------------------------------
# DINOv2 backbone (key names of the official `pretrained.*`)
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with DINOv2's layer scale on both branches."""

    def __init__(self, cfg: DepthAnythingV2Config):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, d * cfg.mlp_ratio)
        self.ls2 = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 ViT/14 that returns the normed patch tokens of the tapped blocks."""

    def __init__(self, cfg: DepthAnythingV2Config):
        super().__init__()
        d = cfg.embed_dim
        self.grid = cfg.pos_grid
        self.patch_embed = PatchEmbed(d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid**2 + 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference, present in the checkpoint
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def pos_encoding(self, gh: int, gw: int) -> torch.Tensor:
        """Position embedding for a gh x gw patch grid.

        Bicubic resize of the 37x37 table by a *scale factor* of (g + 0.1) / 37, as DINOv2 does
        (the 0.1 offset, dinov2 issue #8, keeps floor(37 * scale) == g). With a scale factor torch
        maps coordinates with 37 / (g + 0.1), not 37 / g, so `size=(gh, gw)` would give slightly
        different embeddings than the ones the model was trained and released with.
        """
        if gh == self.grid and gw == self.grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls, table = pos[:, :1], pos[:, 1:]
        dim = table.shape[-1]
        table = table.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=((gh + 0.1) / self.grid, (gw + 0.1) / self.grid), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
        return torch.cat((cls, table), dim=1).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        """(B, 3, 14*gh, 14*gw) -> [(B, gh*gw, C)] normed patch tokens, one per tapped block."""
        gh, gw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        t = t + self.pos_encoding(gh, gw)
        out = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in taps:
                out.append(self.norm(t)[:, 1:])
        return out


# ---------------------------------------------------------------------------------------------
# DPT head (key names of the official `depth_head.*`)
# ---------------------------------------------------------------------------------------------


class ResidualConvUnit(nn.Module):
    """relu -> conv -> relu -> conv, plus the input (DPT's pre-activation unit, no batch norm)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Adds the refined skip feature, refines, upsamples to the next level's size (x2 for the last)."""

    def __init__(self, ch: int):
        super().__init__()
        self.out_conv = nn.Conv2d(ch, ch, 1)
        self.resConfUnit1 = ResidualConvUnit(ch)  # skip branch; present but unused in refinenet4
        self.resConfUnit2 = ResidualConvUnit(ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: Sequence[int] | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    """The DPT decoder proper: per-level 3x3 convs to a common width, four fusion blocks, the output convs."""

    def __init__(self, cfg: DepthAnythingV2Config):
        super().__init__()
        f = cfg.features
        for i, ch in enumerate(cfg.out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(ch, f, 3, padding=1, bias=False))
        for i in range(1, len(cfg.out_channels) + 1):
            setattr(self, f"refinenet{i}", FusionBlock(f))
        self.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(f // 2, cfg.head_hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(cfg.head_hidden, 1, 1), nn.ReLU()
        )


class DPTHead(nn.Module):
    def __init__(self, cfg: DepthAnythingV2Config):
        super().__init__()
        c = cfg.out_channels
        self.projects = nn.ModuleList(nn.Conv2d(cfg.embed_dim, ch, 1) for ch in c)
        # Levels at 4x, 2x, 1x and 1/2x the patch grid.
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = Scratch(cfg)

    def forward(self, tokens: list[torch.Tensor], gh: int, gw: int) -> torch.Tensor:
        """Tapped tokens [(B, gh*gw, C)] x 4 -> disparity (B, 1, 14*gh, 14*gw), >= 0."""
        s = self.scratch
        levels = []
        for t, project, resize in zip(tokens, self.projects, self.resize_layers):
            x = t.transpose(1, 2).reshape(t.shape[0], t.shape[-1], gh, gw)
            levels.append(resize(project(x)))
        l1, l2, l3, l4 = (s.layer1_rn(levels[0]), s.layer2_rn(levels[1]), s.layer3_rn(levels[2]), s.layer4_rn(levels[3]))
        p = s.refinenet4(l4, size=l3.shape[2:])
        p = s.refinenet3(p, l3, size=l2.shape[2:])
        p = s.refinenet2(p, l2, size=l1.shape[2:])
        p = s.refinenet1(p, l1)
        out = s.output_conv1(p)
        out = F.interpolate(out, size=(gh * PATCH, gw * PATCH), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnythingV2(nn.Module):
    """Depth-Anything V2: `state_dict()` has exactly the keys and shapes of the official checkpoint."""

    def __init__(self, cfg: DepthAnythingV2Config = DepthAnythingV2Config()):
        super().__init__()
        self.cfg = cfg
        self.pretrained = DinoV2(cfg)
        self.depth_head = DPTHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, H, W), H and W multiples of 14 -> relative disparity (B, H, W), >= 0."""
        if x.shape[-2] % PATCH or x.shape[-1] % PATCH:
            raise AnnotatorError(f"depth_anything_v2: network input {tuple(x.shape[-2:])} must be a multiple of {PATCH} on both sides.")
        gh, gw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = self.pretrained(x, self.cfg.taps)
        return F.relu(self.depth_head(tokens, gh, gw)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------


def _multiple_of(x: float, minimum: int) -> int:
    """Round to a multiple of 14, rounding up instead if that falls below `minimum` (the reference's lower_bound)."""
    y = int(round(x / PATCH)) * PATCH  # Python's round is banker's rounding, like np.round
    if y < minimum:
        y = int(math.ceil(x / PATCH)) * PATCH
    return y


def network_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Network input size: short side `resolution`, aspect kept, both sides multiples of 14 and >= resolution."""
    scale = max(resolution / height, resolution / width)
    return _multiple_of(scale * height, resolution), _multiple_of(scale * width, resolution)


class DepthAnythingV2Detector(SingleNetworkAnnotator):
    """Relative depth map, near = bright, min-max normalised per image, grey in 3 channels.

    `from_file` loads the official `depth_anything_v2_vits.pth`, strictly: a file that is not a weight file, or has
    other keys or shapes, raises `weights.AnnotatorWeightsError` naming the file.
    """

    name = "depth_anything_v2"
    network = DepthAnythingV2
    model_name = f"Depth-Anything-V2-Small ({FILENAME})"
    strip_prefixes = ()
    channels_last = False  # loaded in the plain layout, as it always was (a ViT; only its patch embedding is a convolution)

    def preprocess(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised network input (B, 3, 14*gh, 14*gw) on the model's device/dtype.

        Plain bicubic without antialiasing, like the reference's cv2.INTER_CUBIC, so downscaled
        inputs look to the network as they do in the reference pipeline.
        """
        h, w = images.shape[-2:]
        nh, nw = network_size(h, w, resolution)
        x = images.to(device=self.device, dtype=torch.float32)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def annotate(self, images: torch.Tensor, resolution: int = 518, **params) -> torch.Tensor:
        if int(resolution) != resolution or resolution < PATCH:
            raise AnnotatorError(f"depth_anything_v2: resolution {resolution!r} must be a whole number of at least {PATCH}.")
        h, w = images.shape[-2:]
        with torch.inference_mode():
            disparity = self.model(self.preprocess(images, int(resolution)))  # (B, h', w'), the whole chunk at once
            d = F.interpolate(disparity[:, None].float(), size=(h, w), mode="bilinear", align_corners=True)
            lo = d.amin(dim=(2, 3), keepdim=True)
            span = d.amax(dim=(2, 3), keepdim=True) - lo
            # A flat prediction (span 0) has no depth to show: black rather than NaN.
            d = torch.where(span > 0, (d - lo) / span.clamp_min(1e-12), torch.zeros_like(d))
        return d.clamp(0, 1).expand(-1, 3, -1, -1).to(images.device).clone()


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def _build(paths: dict, device: torch.device, dtype: torch.dtype) -> DepthAnythingV2Detector:
    return DepthAnythingV2Detector.from_file(paths[FILENAME], device=device, dtype=dtype)


register(AnnotatorInfo(
    key="depth_anything_v2",
    title="Depth (Depth-Anything V2 Small)",
    build=_build,
    params=[
        resolution_param(518, min=PATCH, step=PATCH, tooltip="Short side the network sees, rounded to a multiple of 14 (518 = what the model was trained at). "
                      "Higher gives finer detail but costs time and memory; the map is returned at the input size."),
    ],
    weights=[FILENAME],
    description="Relative depth (near = bright) from Depth-Anything V2 Small, for depth ControlNets. "
                "Sharper and more robust than MiDaS; the Small model is the Apache-2.0 one.",
    licence="Apache-2.0",
), Published(
    FILENAME,
    # Git-LFS oid of the file on the Hub (revision 03876f86...), as recorded by several independent projects.
    sha256="715fade13be8f229f8a70cc02066f656f2423a59effd0579197bbf57860e1378",
    size=99_218_434,
    url="https://huggingface.co/depth-anything/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth",
))
