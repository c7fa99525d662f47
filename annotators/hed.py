"""HED soft edges: the ControlNet 1.1 `ControlNetHED_Apache2` network (`ControlNetHED.pth`, Apache-2.0).

Unlike the original Caffe HED (Xie & Tu, https://arxiv.org/abs/1504.06375) this re-trained model takes RGB
in 0-255 and subtracts a learned per-channel `norm`. Its five side projections are upsampled to the input
size, averaged and passed through a sigmoid (ControlNet-v1-1-nightly `annotator/hed/__init__.py`).

`scribble=True` is the "fake scribble" of ControlNet 1.1 (`gradio_scribble.py`, controlnet-aux `scribble=True`):
non-maximum suppression along four directions, a Gaussian blur and a hard threshold, giving thick binary strokes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import SingleNetworkAnnotator, detect_size, network_input, resize_to
from .registry import AnnotatorInfo, Param, Published, register, resolution_param

FILENAME = "ControlNetHED.pth"
LICENCE = "Apache-2.0"

# (in channels, out channels, convolutions) of the five VGG-style blocks.
_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class HEDBlock(nn.Module):
    """3x3 conv + ReLU stack with a 1x1 side projection to one edge logit map.

    A ModuleList (not a Sequential with ReLUs) keeps the checkpoint's `convs.<i>` numbering.
    """

    def __init__(self, in_channels: int, out_channels: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1) for i in range(layers)
        )
        self.projection = nn.Conv2d(out_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, downsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if downsample:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = conv(x).relu_()
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """(B, 3, H, W) RGB in 0-255 -> five side logit maps at 1, 1/2, 1/4, 1/8, 1/16 of the input size."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (cin, cout, layers) in enumerate(_BLOCKS, start=1):
            self.add_module(f"block{i}", HEDBlock(cin, cout, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        sides = []
        for i in range(1, len(_BLOCKS) + 1):
            h, side = getattr(self, f"block{i}")(h, downsample=i > 1)
            sides.append(side)
        return sides


# --- post-processing shared by the soft-edge annotators -------------------------------------------------


def safe_step(x: torch.Tensor, step: int = 2) -> torch.Tensor:
    """Quantise to `step` + 1 levels (ControlNet 1.1 `safe_step`): hides the faint texture a ControlNet would copy."""
    return torch.floor(x * (step + 1)) / step


def _gaussian_taps(sigma: float, size: int) -> list[float]:
    """Normalised Gaussian samples, as cv2.getGaussianKernel(size, sigma)."""
    g = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(size)]
    total = sum(g)
    return [v / total for v in g]


def _fixed_point_taps(sigma: float, size: int) -> list[int]:
    """OpenCV's bit-exact uint8 Gaussian kernel in 1/256 units (error-diffused rounding, centre takes the rest)."""
    g = _gaussian_taps(sigma, size)
    taps, err = [0] * size, 0.0
    for i in range(size // 2):
        v = g[i] * 256 + err
        taps[i] = taps[size - 1 - i] = int(round(v))
        err = v - taps[i]
    taps[size // 2] = 256 - 2 * sum(taps[: size // 2])
    return taps


def _separable(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Separable filter of (B, 1, H, W) with mirrored borders (cv2.BORDER_REFLECT_101).

    Weighted sums of shifted slices rather than conv2d: exact IEEE arithmetic on every device (no TF32),
    which the fixed-point emulation below relies on.
    """
    pad = len(taps) // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"  # reflect needs pad < size
    h, w = x.shape[-2:]
    p = F.pad(x, (pad, pad, 0, 0), mode=mode)
    x = sum(t * p[..., :, j : j + w] for j, t in enumerate(taps))
    p = F.pad(x, (0, 0, pad, pad), mode=mode)
    return sum(t * p[..., j : j + h, :] for j, t in enumerate(taps))


def _cv_kernel_size(sigma: float, integer_image: bool) -> int:
    """OpenCV's automatic Gaussian size for ksize=(0, 0): 6*sigma+1 for uint8 images, 8*sigma+1 for float ones."""
    return int(round(sigma * (3 if integer_image else 4) * 2 + 1)) | 1


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur(float32 image, (0, 0), sigma) of a (B, 1, H, W) tensor."""
    return _separable(x, _gaussian_taps(sigma, _cv_kernel_size(sigma, integer_image=False)))


def gaussian_blur_uint8(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur(uint8 image, (0, 0), sigma), bit-exact, of a (B, 1, H, W) tensor holding integers 0-255.

    OpenCV blurs uint8 in fixed point (8-bit taps, one rounding at the end); a float blur differs by up to 2
    grey levels, enough to move the scribble threshold. All sums are integers below 2**24, exact in float32.
    """
    taps = _fixed_point_taps(sigma, _cv_kernel_size(sigma, integer_image=True))
    v = _separable(x.float(), [float(t) for t in taps])  # in 1/65536 units
    return torch.floor((v + 32768.0) / 65536.0)


def fake_scribble(edge255: torch.Tensor, threshold: float = 127.0, sigma: float = 3.0) -> torch.Tensor:
    """ControlNet 1.1 fake scribble of a (B, 1, H, W) 0-255 integer edge map -> binary (B, 1, H, W) in {0, 1}.

    `nms`: blur, keep pixels that are maxima along at least one of the four 3-pixel lines through them and
    brighter than `threshold`; then blur the thin result again (as uint8) and keep everything above 4,
    which thickens the strokes.
    """
    x = gaussian_blur(edge255.float(), sigma)
    p = F.pad(x, (1, 1, 1, 1), value=-math.inf)  # cv2.dilate ignores the border
    h, w = x.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    lines = (((0, -1), (0, 1)), ((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1)))
    is_max = torch.zeros_like(x, dtype=torch.bool)
    for a, b in lines:
        is_max |= (x >= at(*a)) & (x >= at(*b))
    thin = ((x > threshold) & is_max).float() * 255.0
    return (gaussian_blur_uint8(thin, sigma) > 4).float()


def resize_input(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize to the detect size: bicubic when enlarging (the reference uses Lanczos), area-like when shrinking."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    up = height * width > images.shape[-2] * images.shape[-1]
    return resize_to(images, height, width, "bicubic" if up else "bilinear").clamp(0, 1)


# --- the annotator ----------------------------------------------------------------------------------------


class HEDDetector(SingleNetworkAnnotator):
    """Soft edge maps from ControlNetHED (the ControlNet 1.1 "softedge_hed" / "scribble_hed" preprocessor).

    `HEDDetector.from_file("ControlNetHED.pth")` loads the flat state dict (a 'module.' prefix is tolerated)."""

    name = "hed"
    network = ControlNetHED
    model_name = "ControlNetHED (HED soft edge)"

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) RGB in [0, 1] -> (B, 1, h, w) edge probability at the same size (the raw network output)."""
        h, w = images.shape[-2:]
        x = network_input(images * 255.0, self.device, self.dtype)
        sides = [
            F.interpolate(s.float(), size=(h, w), mode="bilinear", align_corners=False) for s in self.model(x)
        ]
        return torch.sigmoid(torch.stack(sides, 0).mean(0))

    def annotate(self, images: torch.Tensor, resolution: int = 512, safe: bool = False, scribble: bool = False) -> torch.Tensor:
        """RGB (B, 3, H, W) in [0, 1] -> soft edges (B, 3, H, W) in [0, 1], white edges on black.

        The network runs at `resolution` (short side, multiple of 64), like ControlNet 1.1's `resize_image`;
        the result is resized back to H x W.
        """
        H, W = images.shape[-2:]
        h, w = detect_size(H, W, int(resolution))
        with torch.inference_mode():
            edge = self.edges(resize_input(images, h, w))
            if safe:
                edge = safe_step(edge)
            edge = edge.clamp(0, 1)
            if scribble:
                # As the reference: the uint8 map, resized to the output size (cv2.INTER_LINEAR, rounded), then NMS.
                edge255 = torch.floor(edge * 255.0)
                if (h, w) != (H, W):
                    edge255 = F.interpolate(edge255, size=(H, W), mode="bilinear", align_corners=False).round()
                out = fake_scribble(edge255)
            else:
                out = resize_to(edge, H, W).clamp(0, 1)
            return out.float().repeat(1, 3, 1, 1).to(images.device)


RESOLUTION = resolution_param(step=64, tooltip="Short side the network sees (rounded to a multiple of 64); the output keeps the input size.")
SAFE = Param("safe", "BOOLEAN", False, tooltip="Quantise the edges to a few levels (ControlNet 1.1 'safe' mode), hiding faint texture the ControlNet would copy.")

register(
    AnnotatorInfo(
        key="hed",
        title="HED soft edges",
        build=lambda paths, device, dtype: HEDDetector.from_file(paths[FILENAME], device=device, dtype=dtype),
        params=[
            RESOLUTION,
            SAFE,
            Param("scribble", "BOOLEAN", False, tooltip="Turn the soft edges into thick binary strokes (ControlNet 1.1 'fake scribble': NMS, blur, threshold)."),
        ],
        weights=[FILENAME],
        description="Soft, multi-scale edges from the ControlNet 1.1 HED network (softedge and scribble ControlNets).",
        licence=LICENCE,
    ),
    # lllyasviel/Annotators' published file, as pinned by several independent manifests (Haidra-Org's
    # horde_model_reference annotator catalog among them)
    Published(FILENAME, sha256="5ca93762ffd68a29fee1af9d495bf6aab80ae86f08905fb35472a083a4c7a8fa", size=29_444_406),
)
