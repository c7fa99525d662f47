"""M-LSD straight-line detector: white 1-px line segments on black, the condition of the MLSD ControlNets.

Network: MobileNetV2 (TFLite-style padding, 4 input channels) plus a small U-Net-like decoder
whose last 9 channels form the "TP map" (tri-points: centre heat map + start/end displacements),
at half the input resolution (Gu et al., "Towards Light-weight and Real-time Line Segment
Detection", https://arxiv.org/abs/2106.00186; PyTorch port github.com/lhwcv/mlsd_pytorch, Apache-2.0).
Two sizes share the head: "large" (`mlsd_large_512_fp32.pth`, the one ControlNet uses) and "tiny".

Pipeline, as ControlNet 1.1 `annotator/mlsd` and controlnet-aux `MLSDdetector`:
1. resize so the short side is `resolution` (multiple of 64); RGB 0-255 plus a constant channel of
   ones, all `/127.5 - 1` (so the fourth channel is 1/127.5 - 1, not 1);
2. one batched forward pass -> TP map (B, 9, h/2, w/2);
3. decode per image: sigmoid centre, 3x3 max-pool NMS, top 200, keep `score > value_threshold` and
   `length > distance_threshold` (length in TP-map pixels), endpoints x2 to detect pixels;
4. draw each segment with `cv2.line(..., 255, 1)` after `int()` truncation.
The reference draws at the detect size and bilinearly resizes the drawing to the output size; here
the segments are scaled to the input size and drawn there, so lines stay 1 px and crisp (identical
when the input already has the detect size).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import AnnotatorError, SingleNetworkAnnotator, detect_size, fold_batch_norms, network_input, resize_to
from .registry import AnnotatorInfo, Param, Published, register, resolution_param

log = logging.getLogger(__name__)

LARGE_FILE = "mlsd_large_512_fp32.pth"
TINY_FILE = "mlsd_tiny_512_fp32.pth"
LICENCE = "Apache-2.0"

TOP_K = 200  # candidate centres per image (reference `deccode_output_score_and_ptss(..., 200, 3)`)
NMS_KERNEL = 3
_COORD_LIMIT = float(1 << 30)  # cv2.line takes int32 points; anything beyond is garbage output anyway


# ---------------------------------------------------------------- backbone


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6. Stride-2 convs pad only right/bottom, as TFLite "SAME" does:
    the weights were trained with that padding, so symmetric padding would shift every feature."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        padding = 0 if stride == 2 else (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when ratio 1), 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """The MobileNetV2 trunk M-LSD uses (width 1.0, truncated after the 96-channel stage for large,
    after the 64-channel stage for tiny), returning the feature maps listed in `taps`."""

    # (expansion t, channels c, repeats n, first stride s), MobileNetV2 table 2
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))

    def __init__(self, num_stages: int, taps: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(4, 32, stride=2)]  # RGB + ones channel
        cin = 32
        for t, c, n, s in self.STAGES[:num_stages]:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


# ---------------------------------------------------------------- decoder


def _conv_bn_relu(cin: int, cout: int, kernel: int, padding: int = 0, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class FuseBlock(nn.Module):
    """Decoder "block type A": 1x1 projections of a skip feature `a` and the deeper feature `b`
    (upsampled x2 unless `upscale=False`), concatenated [a, b]."""

    def __init__(self, skip_in: int, deep_in: int, skip_out: int, deep_out: int, upscale: bool = True):
        super().__init__()
        self.conv1 = _conv_bn_relu(deep_in, deep_out, 1)
        self.conv2 = _conv_bn_relu(skip_in, skip_out, 1)
        self.upscale = upscale

    def forward(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        deep = self.conv1(deep)
        skip = self.conv2(skip)
        if self.upscale:
            deep = _up2(deep)
        return torch.cat((skip, deep), dim=1)


class ResBlock(nn.Module):
    """Decoder "block type B": residual 3x3 conv, then a 3x3 conv to `cout` channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cin, 3, padding=1)
        self.conv2 = _conv_bn_relu(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x).add_(x))  # in place: conv1 gives a fresh tensor


class HeadBlock(nn.Module):
    """Decoder "block type C": dilated 3x3 (rate 5), 3x3, then a 1x1 to the 16 output maps."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cin, 3, padding=5, dilation=5)
        self.conv2 = _conv_bn_relu(cin, cin, 3, padding=1)
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    """M-LSD large (`mlsd_large_512_fp32.pth`, 1,533,680 parameters).

    (B, 4, H, W) in [-1, 1], H and W multiples of 16 -> TP map (B, 9, H/2, W/2): channel 0 the
    centre logits, 1:5 the (x_start, y_start, x_end, y_end) displacements in TP-map pixels.
    """

    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2Features(num_stages=5, taps=(1, 3, 6, 10, 13))
        self.block15 = FuseBlock(64, 96, 64, 64, upscale=False)
        self.block16 = ResBlock(128, 64)
        self.block17 = FuseBlock(32, 64, 64, 64)
        self.block18 = ResBlock(128, 64)
        self.block19 = FuseBlock(24, 64, 64, 64)
        self.block20 = ResBlock(128, 64)
        self.block21 = FuseBlock(16, 64, 64, 64)
        self.block22 = ResBlock(128, 64)
        self.block23 = HeadBlock(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)  # strides 2, 4, 8, 16, 16
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]  # the first 7 maps are training-only outputs


class MLSDTiny(nn.Module):
    """M-LSD tiny (`mlsd_tiny_512_fp32.pth`): shallower trunk, decoder at stride 4, output upsampled x2.
    Same input and TP-map contract as `MLSDLarge`."""

    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2Features(num_stages=4, taps=(3, 6, 10))
        self.block12 = FuseBlock(32, 64, 64, 64)
        self.block13 = ResBlock(128, 64)
        self.block14 = FuseBlock(24, 64, 32, 32)
        self.block15 = ResBlock(64, 64)
        self.block16 = HeadBlock(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c2, c3, c4 = self.backbone(x)  # strides 4, 8, 16
        x = self.block13(self.block12(c3, c4))
        x = self.block15(self.block14(c2, x))
        return _up2(self.block16(x)[:, 7:])


# ---------------------------------------------------------------- pre/post-processing


def to_network_input(images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> (B, 4, H, W): `[RGB*255, 1] / 127.5 - 1`, as the reference."""
    ones = torch.full_like(images[:, :1], 1.0 / 127.5 - 1.0)
    return torch.cat((images * 2.0 - 1.0, ones), dim=1)


def decode_segments(tp_map: torch.Tensor, value_threshold: float, distance_threshold: float, top_k: int = TOP_K) -> list[np.ndarray]:
    """TP map (B, >=5, h, w) -> per image a float64 array (N, 4) of (x1, y1, x2, y2) in TP-map pixels.

    Centre heat = sigmoid(channel 0), suppressed where it is not the maximum of its 3x3 window; the
    `top_k` strongest centres whose score exceeds `value_threshold` and whose segment is longer than
    `distance_threshold` are kept. Endpoints = centre + displacement (channels 1:5).
    """
    tp = tp_map.float()
    b, _, h, w = tp.shape
    heat = torch.sigmoid(tp[:, 0:1])
    peak = F.max_pool2d(heat, NMS_KERNEL, stride=1, padding=(NMS_KERNEL - 1) // 2)
    heat = (heat * (peak == heat)).flatten(1)  # (B, h*w)
    scores, index = heat.topk(min(top_k, h * w), dim=1)  # (B, K), strongest first
    disp = tp[:, 1:5].flatten(2).gather(2, index[:, None].expand(-1, 4, -1)).double()  # (B, 4, K)
    ys, xs = (index // w).double(), (index % w).double()
    length = torch.sqrt((disp[:, 0] - disp[:, 2]) ** 2 + (disp[:, 1] - disp[:, 3]) ** 2)
    keep = (scores > value_threshold) & (length > distance_threshold)
    seg = torch.stack((xs + disp[:, 0], ys + disp[:, 1], xs + disp[:, 2], ys + disp[:, 3]), dim=-1)  # (B, K, 4)
    keep &= torch.isfinite(seg).all(-1)
    return [seg[i][keep[i]].cpu().numpy() for i in range(b)]


def draw_segments(segments: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 4) float (x1, y1, x2, y2) in pixels -> uint8 (height, width), 255 on 1-px lines.
    Coordinates are truncated with `int()` like the reference before `cv2.line`."""
    canvas = np.zeros((height, width), np.uint8)
    pts = np.clip(segments, -_COORD_LIMIT, _COORD_LIMIT).astype(np.int64)  # truncation toward zero
    for x1, y1, x2, y2 in pts.tolist():
        cv2.line(canvas, (x1, y1), (x2, y2), 255, 1)
    return canvas


# ---------------------------------------------------------------- detector


class MLSDDetector(SingleNetworkAnnotator):
    """M-LSD large: images (B, 3, H, W) in [0, 1] -> straight-line maps (B, 3, H, W) in {0, 1}."""

    name = "mlsd"
    network: type[nn.Module] = MLSDLarge
    model_name = "M-LSD large"

    @classmethod
    def prepare(cls, model: nn.Module) -> nn.Module:
        return fold_batch_norms(model.float().eval())

    @classmethod
    def from_file(cls, path: os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "MLSDDetector":
        """Load the official flat state dict (a `module.` prefix is tolerated); strict, with a clear error.

        float32 is recommended whatever the device: the model is small, and the decoding (3x3 peak test,
        top-200 cut, endpoint truncation) turns half-precision rounding into different segments.
        """
        det = super().from_file(path, device=device, dtype=dtype)
        if dtype != torch.float32:
            log.warning("%s: running in %s changes which line segments are found; float32 is recommended.", cls.name, dtype)
        return det

    def segments(self, images: torch.Tensor, resolution: int = 512, value_threshold: float = 0.1, distance_threshold: float = 0.1) -> list[np.ndarray]:
        """Clean RGB batch (B, 3, H, W) in [0, 1] -> per image (N, 4) float64 (x1, y1, x2, y2) in input pixels."""
        if resolution < 1:
            raise AnnotatorError(f"{self.name}: resolution must be positive; got {resolution}.")
        height, width = images.shape[-2:]
        dh, dw = detect_size(height, width, resolution)
        x = network_input(to_network_input(resize_to(images, dh, dw)), self.device, self.dtype)
        with torch.inference_mode():
            tp_map = self.model(x)
        # TP-map pixels are half detect pixels; then detect -> input size
        scale = np.array([2.0 * width / dw, 2.0 * height / dh] * 2)
        return [s * scale for s in decode_segments(tp_map, value_threshold, distance_threshold)]

    def annotate(self, images: torch.Tensor, resolution: int = 512, value_threshold: float = 0.1, distance_threshold: float = 0.1) -> torch.Tensor:
        """Clean RGB batch (B, 3, H, W) in [0, 1] -> white 1-px segments on black, (B, 3, H, W) in {0, 1}."""
        height, width = images.shape[-2:]
        maps = [draw_segments(s, height, width) for s in self.segments(images, resolution, value_threshold, distance_threshold)]
        out = torch.from_numpy(np.stack(maps)).to(images.device, torch.float32) / 255.0
        return out[:, None].expand(-1, 3, -1, -1).contiguous()


class TinyMLSDDetector(MLSDDetector):
    """M-LSD tiny: faster, fewer and shorter lines; same outputs and parameters as `MLSDDetector`."""

    name = "mlsd_tiny"
    network = MLSDTiny
    model_name = "M-LSD tiny"


# ---------------------------------------------------------------- registration

_PARAMS = (
    resolution_param(step=64, tooltip="Short side the image is resized to before detection (rounded to a multiple of 64)."),
    # ranges and defaults as the ControlNet demo sliders (gradio_hough2image.py, sd-webui-controlnet)
    Param("value_threshold", "FLOAT", 0.1, min=0.01, max=2.0, step=0.01,
          tooltip="Minimum line-centre score (0-1): higher keeps only confident lines; above 1 keeps none."),
    Param("distance_threshold", "FLOAT", 0.1, min=0.01, max=20.0, step=0.01,
          tooltip="Minimum segment length, in pixels of the half-resolution line map: higher drops short lines."),
)

register(
    AnnotatorInfo(
        key="mlsd",
        title="M-LSD straight lines",
        build=lambda paths, device, dtype: MLSDDetector.from_file(paths[LARGE_FILE], device=device, dtype=dtype),
        params=_PARAMS,
        weights=[LARGE_FILE],
        description="Straight line segments (M-LSD large), white 1-px lines on black: for the MLSD ControlNets (architecture, interiors).",
        licence=LICENCE,
    ),
    Published(LARGE_FILE, sha256="5696f168eb2c30d4374bbfd45436f7415bb4d88da29bea97eea0101520fba082", size=6_341_481),
)
register(
    AnnotatorInfo(
        key="mlsd_tiny",
        title="M-LSD straight lines (tiny)",
        build=lambda paths, device, dtype: TinyMLSDDetector.from_file(paths[TINY_FILE], device=device, dtype=dtype),
        params=_PARAMS,
        weights=[TINY_FILE],
        description="Straight line segments with the small M-LSD model (2.6 MB): faster, fewer lines than 'mlsd'.",
        licence=LICENCE,
    ),
    # Not in lllyasviel/Annotators (and never used by ControlNet itself); this is the PyTorch port's
    # own file, which lllyasviel/ControlNet also mirrors as annotator/ckpts/mlsd_tiny_512_fp32.pth.
    Published(TINY_FILE, sha256="3f2323cfb9faec5a0ef2454c4f68998da21a9f1b7918ce89b85886628b750b94", size=2_613_835,
              url=f"https://raw.githubusercontent.com/lhwcv/mlsd_pytorch/main/models/{TINY_FILE}"),
)
