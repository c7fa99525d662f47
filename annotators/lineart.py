"""Realistic line art (fine and coarse): white lines on black, the condition of the lineart ControlNets.

Network: the "Informative Drawings" generator `Generator(3, 1, n_residual_blocks=3)` (Chan, Durand,
Isola, CVPR 2022, https://arxiv.org/abs/2203.12691; code github.com/carolineec/informative-drawings,
MIT): reflection-padded 7x7 stem, two stride-2 downsamplings, three residual blocks at 256 channels,
two transposed-conv upsamplings, 7x7 conv + sigmoid. Instance norms carry no weights.
`sk_model.pth` gives fine lines, `sk_model2.pth` coarse ones; both have the same keys.

Pipeline, as ControlNet 1.1 `annotator/lineart` + `gradio_lineart.py` and controlnet-aux `LineartDetector`:
resize so the short side is `resolution` (multiple of 64), RGB / 255 -> network -> sigmoid map
(dark lines on white) -> resize back -> `1 - x`, i.e. white lines on black, which is what the
ControlNet lineart models were trained on. The reference quantises the map to uint8 before the
inversion; here it stays float (at most 1/255 apart).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import AnnotatorError, SingleNetworkAnnotator, detect_size, network_input, resize_to
from .cpu_kernels import FewOutputConv2d
from .registry import AnnotatorInfo, Published, register, resolution_param

FINE_FILE = "sk_model.pth"
COARSE_FILE = "sk_model2.pth"
LICENCE = "MIT"


class InstanceNorm(nn.Module):
    """`nn.InstanceNorm2d` without weights (eps 1e-5, biased variance), computed so a channels-last input stays
    channels-last: PyTorch's own runs through batch norm on a reshaped NCHW copy, and on a CPU those copies took a
    quarter of the generator's time. Statistics in float32 whatever the input's dtype."""

    SQUARES_CHUNK = 1 << 20  # elements squared at a time: a cache-sized temporary instead of a full-size one

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, H*W, C) is a free view of a channels-last tensor: the statistics reduce over its middle dimension,
        # vectorised across channels
        pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        centred = pixels - pixels.mean(1, keepdim=True, dtype=torch.float32)  # float32, the one full-size result
        # two passes (mean, then squares of the centred values): as exact as Welford here and much faster on a CPU.
        # The squares are summed chunk by chunk: a full-size temporary costs a page fault per 4 KiB on every call
        # (above glibc's 32 MiB mmap threshold), which on 2 cores made this layer 1.6x slower at 512x512.
        squares = torch.zeros(b, 1, c, dtype=torch.float32, device=x.device)
        for part in centred.split(max(1, self.SQUARES_CHUNK // c), dim=1):
            squares += part.square().sum(1, keepdim=True)
        out = centred.mul_(torch.rsqrt(squares.div_(h * w).add_(self.eps))).to(x.dtype)
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class ResidualBlock(nn.Module):
    """x + (pad, 3x3 conv, instance norm, ReLU, pad, 3x3 conv, instance norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            InstanceNorm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            InstanceNorm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x).add_(x)  # in place into the block's fresh output: no new full-size tensor


def _down(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), InstanceNorm(cout), nn.ReLU(inplace=True)]


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1), InstanceNorm(cout), nn.ReLU(inplace=True)]


class LineartGenerator(nn.Module):
    """Informative-drawings generator, 4,290,945 parameters.

    RGB (B, 3, H, W) in [0, 1], H and W multiples of 4 -> line map (B, 1, H, W) in (0, 1), lines dark.
    The `model0`..`model4` attribute names are the checkpoint's key prefixes.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, residual_blocks: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, 64, 7), InstanceNorm(64), nn.ReLU(inplace=True))
        self.model1 = nn.Sequential(*_down(64, 128), *_down(128, 256))
        self.model2 = nn.Sequential(*[ResidualBlock(256) for _ in range(residual_blocks)])
        self.model3 = nn.Sequential(*_up(256, 128), *_up(128, 64))
        # the 64 -> 1 channel 7x7 conv as a GEMM on CPUs (oneDNN runs it at a tenth of its speed; cpu_kernels.py)
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), FewOutputConv2d(64, out_channels, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class LineartDetector(SingleNetworkAnnotator):
    """Fine realistic line art: images (B, 3, H, W) in [0, 1] -> white lines on black (B, 3, H, W) in [0, 1].

    `from_file` loads the official flat state dict (a `module.` prefix is tolerated), strictly, with a clear error."""

    name = "lineart"
    network = LineartGenerator
    model_name = "line art (informative-drawings Generator(3, 1, 3))"

    def annotate(self, images: torch.Tensor, resolution: int = 512) -> torch.Tensor:
        """Clean RGB batch (B, 3, H, W) in [0, 1] -> `1 - line map` at the input size, 3 channels."""
        if resolution < 1:
            raise AnnotatorError(f"{self.name}: resolution must be positive; got {resolution}.")
        height, width = images.shape[-2:]
        dh, dw = detect_size(height, width, resolution)
        x = network_input(resize_to(images, dh, dw), self.device, self.dtype)
        with torch.inference_mode():
            line = self.model(x).float()
        line = resize_to(line, height, width).to(images.device)
        return (1.0 - line).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


class CoarseLineartDetector(LineartDetector):
    """Coarse realistic line art (`sk_model2.pth`): bolder, simpler strokes; same network and outputs."""

    name = "lineart_coarse"


# ---------------------------------------------------------------- registration

_PARAMS = (resolution_param(step=64, tooltip="Short side the image is resized to before detection (rounded to a multiple of 64)."),)

register(
    AnnotatorInfo(
        key="lineart",
        title="Line art (realistic)",
        build=lambda paths, device, dtype: LineartDetector.from_file(paths[FINE_FILE], device=device, dtype=dtype),
        params=_PARAMS,
        weights=[FINE_FILE],
        description="Fine line drawing of a photo, white lines on black: for the lineart ControlNets.",
        licence=LICENCE,
    ),
    Published(FINE_FILE, sha256="c686ced2a666b4850b4bb6ccf0748031c3eda9f822de73a34b8979970d90f0c6", size=17_173_511),
)
register(
    AnnotatorInfo(
        key="lineart_coarse",
        title="Line art (realistic, coarse)",
        build=lambda paths, device, dtype: CoarseLineartDetector.from_file(paths[COARSE_FILE], device=device, dtype=dtype),
        params=_PARAMS,
        weights=[COARSE_FILE],
        description="Coarser, bolder line drawing of a photo, white lines on black: for the lineart ControlNets.",
        licence=LICENCE,
    ),
    Published(COARSE_FILE, sha256="30a534781061f34e83bb9406b4335da4ff2616c95d22a585c1245aa8363e74e0", size=17_173_511),
)
