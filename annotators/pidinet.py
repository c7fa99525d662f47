"""PiDiNet soft edges (Su et al., "Pixel Difference Networks for Efficient Edge Detection",
https://arxiv.org/abs/2108.07009), the `table5_pidinet.pth` model used by ControlNet 1.1's softedge preprocessor.

Configuration "carv4" with 60 channels, compact spatial attention and dilation modules (24 channels).
Its pixel-difference convolutions (central `cd`, angular `ad`, radial `rd`) are linear in the weights, so each
is run as one vanilla convolution whose kernel is derived from the stored 3x3 weights (the paper's
"converted" inference form, `convert_pidinet.py`): `cd` and `ad` give 3x3 kernels, `rd` a 5x5 kernel.
The state dict keeps the official, unconverted weights.

Input is **BGR** in [0, 1]; the output is the last (fused) of the sigmoid side outputs.
Licence: MIT, with the authors' note that the models are for research purposes (commercial use: contact them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import SingleNetworkAnnotator, detect_size, network_input, resize_to
from .hed import RESOLUTION, SAFE, resize_input, safe_step
from .registry import AnnotatorInfo, Published, register

FILENAME = "table5_pidinet.pth"
LICENCE = "MIT; the PiDiNet authors release the models for research purposes (commercial use: contact the authors)"

# Pixel-difference type of the init block and the 15 residual blocks ("carv4": cd, ad, rd, vanilla, repeated).
CARV4 = ("cd", "ad", "rd", "cv") * 4
# Clockwise neighbour of each 3x3 position, for the angular difference (`ad`).
_AD_SHIFT = [3, 0, 1, 6, 4, 2, 7, 8, 5]
# Where the 8 outer weights land in the 5x5 radial kernel (+w on the outer ring, -w on the inner ring).
_RD_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
_RD_INNER = [6, 7, 8, 11, 13, 16, 17, 18]


class PixelDifferenceConv(nn.Module):
    """A 3x3 pixel-difference convolution, evaluated as the equivalent vanilla convolution.

    cd: sum w_i (x_i - x_c)       -> centre tap minus the sum of the kernel
    ad: sum w_i (x_i - x_next(i)) -> kernel minus its clockwise-shifted copy
    rd: sum w_i (x_outer - x_inner) on a 5x5 window -> 5x5 kernel, padding 2
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        if kind not in ("cv", "cd", "ad", "rd"):
            raise ValueError(f"unknown pixel-difference type {kind!r}; expected one of cv, cd, ad, rd.")
        self.kind, self.groups = kind, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def vanilla_kernel(self) -> tuple[torch.Tensor, int]:
        """(kernel, padding) of the plain convolution that computes this pixel-difference convolution."""
        w = self.weight
        o, i = w.shape[:2]
        if self.kind == "cv":
            return w, 1
        if self.kind == "cd":
            k = w.clone()
            k[:, :, 1, 1] -= w.sum(dim=(2, 3))
            return k, 1
        flat = w.reshape(o, i, 9)
        if self.kind == "ad":
            return (flat - flat[:, :, _AD_SHIFT]).reshape(o, i, 3, 3), 1
        k = w.new_zeros(o, i, 25)
        k[:, :, _RD_OUTER] = flat[:, :, 1:]
        k[:, :, _RD_INNER] = -flat[:, :, 1:]
        return k.reshape(o, i, 5, 5), 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, pad = self.vanilla_kernel()
        return F.conv2d(x, k, padding=pad, groups=self.groups)


class PDCBlock(nn.Module):
    """Depthwise pixel-difference conv, ReLU, 1x1 conv, residual; `stride=2` max-pools first and projects the shortcut."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.conv1 = PixelDifferenceConv(kind, in_channels, in_channels, groups=in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(self.conv1(x).relu_())
        return y.add_(self.shortcut(x) if self.stride > 1 else x)  # in place: y is fresh, a new tensor costs page faults


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1 reduce, then four dilated 3x3 convs (5, 7, 9, 11) summed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        for j, d in enumerate((5, 7, 9, 11), start=1):
            self.add_module(f"conv2_{j}", nn.Conv2d(out_channels, out_channels, kernel_size=3, dilation=d, padding=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention: a sigmoid mask from ReLU -> 1x1 (4 ch) -> 3x3 (1 ch) multiplies the features."""

    def __init__(self, channels: int, mid_channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid_channels, kernel_size=1)
        self.conv2 = nn.Conv2d(mid_channels, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    """1x1 conv to one edge logit map."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet carv4 + SA + dilation: (B, 3, H, W) BGR in [0, 1] -> five sigmoid maps (B, 1, H, W), the last fused."""

    def __init__(self, channels: int = 60, dil: int = 24, pdcs: tuple[str, ...] = CARV4):
        super().__init__()
        c = channels
        self.init_block = PixelDifferenceConv(pdcs[0], 3, c)
        stages = ((c, c, 3), (c, 2 * c, 4), (2 * c, 4 * c, 4), (4 * c, 4 * c, 4))
        layer = 1
        fuse = []
        for s, (cin, cout, n) in enumerate(stages, start=1):
            for j in range(1, n + 1):
                stride = 2 if (j == 1 and s > 1) else 1
                self.add_module(f"block{s}_{j}", PDCBlock(pdcs[layer], cin if j == 1 else cout, cout, stride))
                layer += 1
            fuse.append(cout)
        self.stage_sizes = tuple(n for _, _, n in stages)
        self.conv_reduces = nn.ModuleList(MapReduce(dil) for _ in fuse)
        self.attentions = nn.ModuleList(CSAM(dil) for _ in fuse)
        self.dilations = nn.ModuleList(CDCM(f, dil) for f in fuse)
        self.classifier = nn.Conv2d(len(fuse), 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        H, W = x.shape[-2:]
        h = self.init_block(x)
        feats = []
        for s, n in enumerate(self.stage_sizes, start=1):
            for j in range(1, n + 1):
                h = getattr(self, f"block{s}_{j}")(h)
            feats.append(h)
        sides = []
        for i, f in enumerate(feats):
            e = self.conv_reduces[i](self.attentions[i](self.dilations[i](f)))
            sides.append(F.interpolate(e, size=(H, W), mode="bilinear", align_corners=False))
        sides.append(self.classifier(torch.cat(sides, dim=1)))
        return [torch.sigmoid(s) for s in sides]


class PiDiNetDetector(SingleNetworkAnnotator):
    """Soft edge maps from PiDiNet (the ControlNet 1.1 "softedge_pidinet" preprocessor).

    `PiDiNetDetector.from_file("table5_pidinet.pth")` loads {'state_dict': {'module.' + key: tensor}} (a DataParallel
    training checkpoint)."""

    name = "pidinet"
    network = PiDiNet
    model_name = "PiDiNet (table5_pidinet)"

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) RGB in [0, 1] -> (B, 1, h, w) fused edge probability (the raw network output)."""
        bgr = network_input(images.flip(1), self.device, self.dtype)  # trained on OpenCV (BGR) images
        return self.model(bgr)[-1].float()

    def annotate(self, images: torch.Tensor, resolution: int = 512, safe: bool = False) -> torch.Tensor:
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
            out = resize_to(edge.clamp(0, 1), H, W).clamp(0, 1)
            return out.repeat(1, 3, 1, 1).to(images.device)


register(
    AnnotatorInfo(
        key="pidinet",
        title="PiDiNet soft edges",
        build=lambda paths, device, dtype: PiDiNetDetector.from_file(paths[FILENAME], device=device, dtype=dtype),
        params=[RESOLUTION, SAFE],
        weights=[FILENAME],
        description="Soft edges from PiDiNet (pixel difference network, 0.7 M parameters); the ControlNet 1.1 softedge default.",
        licence=LICENCE,
    ),
    # the same file as hellozhuo/pidinet trained_models/table5_pidinet.pth, as pinned by several independent
    # manifests (Haidra-Org's horde_model_reference annotator catalog among them)
    Published(FILENAME, sha256="80860ac267258b5f27486e0ef152a211d0b08120f62aeb185a050acc30da486c", size=None),
)
