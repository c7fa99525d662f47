"""Annotators without weights: they work on a fresh offline machine.

Each wraps one OpenCV/numpy recipe of the ControlNet 1.0/1.1 annotators, run per image at the detect
resolution (OpenCV works on single images), and returns maps at the input's size.
"""
from __future__ import annotations

import abc
import json
import math
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from .base import Annotator, AnnotatorError, as_rgb, detect_size, resize_to, sanitized
from .registry import AnnotatorInfo, Param, register, resolution_param

RES = resolution_param(tooltip="Detect resolution: the short side the image is processed at.")




# Floats in [+0, 1] are exactly the float32 bit patterns 0 .. 0x3F800000 read as unsigned integers; a negative value
# (sign bit set), anything above 1, the infinities and NaN all read as larger numbers.
_ONE_BITS = int(np.float32(1.0).view(np.uint32))
# uint8 -> float32 in [0, 1] as a table: the same IEEE division, x / 255 in float32, done once for the 256 values
_TO_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def image_uint8(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) float -> HxWx3 uint8 RGB, rounded and saturated (NaN and -inf -> 0, +inf -> 255); uint8 passes.

    Saturating here is what lets PerImage skip as_rgb's separate range pass. The usual case, a CPU float32 image
    in [0, 1] laid out channels-last (a ComfyUI IMAGE), is converted without a copy: one range check (a max over
    the float bits read as unsigned integers, see _ONE_BITS) and one OpenCV scaling pass, on the calling thread.
    Why not torch: its OpenMP threads keep spinning for a while after each operation and take the cores from the
    cv2.Canny that follows (measured: the uint8 -> float -> uint8 round trip cost more than cv2.Canny itself).
    Other images take the torch path.
    """
    hwc = image.permute(1, 2, 0)
    if hwc.dtype == torch.uint8:
        return hwc.contiguous().cpu().numpy()  # contiguous HxWx3: OpenCV would copy a strided one
    if hwc.device.type == "cpu" and hwc.dtype == torch.float32 and hwc.is_contiguous():
        flat = hwc.numpy().reshape(hwc.shape[0], -1)
        if int(flat.view(np.uint32).max()) <= _ONE_BITS:  # all in [+0, 1]: no sign, overflow or NaN to lose below
            return cv2.convertScaleAbs(flat, alpha=255.0).reshape(hwc.shape)
    # the same arithmetic as OpenCV's (x * 255 in float32, rounded half to even), so both paths give one answer
    hwc = torch.nan_to_num(hwc.float(), nan=0.0, posinf=1.0, neginf=0.0).mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return hwc.contiguous().cpu().numpy()


def from_uint8(maps: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """HxW (gray, repeated into 3 channels) or HxWx3 uint8 maps -> (B,3,H,W) float [0,1] on like's device.

    Each map goes through one table lookup by OpenCV on the calling thread (x / 255 bit for bit; see `image_uint8`
    for why not torch). The layout follows `like`: a channels-last batch (a ComfyUI IMAGE seen as B,3,H,W) gets a
    channels-last result whose memory is B,H,W,3, so the node layer returns it without another copy (gray maps are
    made RGB on the bytes first); otherwise gray maps stay one plane, broadcast to 3 channels without a copy."""
    h, w = maps[0].shape[:2]
    for m in maps:
        if m.dtype != np.uint8 or m.shape[:2] != (h, w) or m.ndim not in (2, 3) or (m.ndim == 3 and m.shape[2] != 3):
            raise AnnotatorError(f"from_uint8: expected {h}x{w} or {h}x{w}x3 uint8 maps; got {m.shape} {m.dtype}.")
    gray = maps[0].ndim == 2 and all(m.ndim == 2 for m in maps)
    if gray and not (like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)):
        out = torch.empty((len(maps), h, w), dtype=torch.float32)
        for m, dst in zip(maps, out.numpy()):
            cv2.LUT(m, _TO_FLOAT, dst=dst)
        return out.to(like.device)[:, None].expand(-1, 3, -1, -1)
    out = torch.empty((len(maps), h, w, 3), dtype=torch.float32)
    for m, dst in zip(maps, out.numpy()):
        cv2.LUT(cv2.cvtColor(m, cv2.COLOR_GRAY2RGB) if m.ndim == 2 else m, _TO_FLOAT, dst=dst)
    return out.permute(0, 3, 1, 2).to(like.device)


class PerImage(Annotator):
    """An OpenCV recipe applied image by image at the detect resolution, resized back to the input size."""

    multiple = 8
    sanitizes_input = True  # the uint8 conversion saturates
    accepts_uint8 = True  # OpenCV's own input type: no conversion at all

    def annotate(self, images: torch.Tensor, resolution: int = 512, **params) -> torch.Tensor:
        h, w = images.shape[-2:]
        dh, dw = detect_size(h, w, resolution, self.multiple)
        x = images
        if (dh, dw) != (h, w):
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else sanitized(x)  # NaN must not spread in a resize
            x = resize_to(x, dh, dw)
        maps = [self.one(image_uint8(a), **params) for a in x]  # OpenCV parallelises inside each call
        out = from_uint8(maps, images)
        return out if (dh, dw) == (h, w) else resize_to(out, h, w).clamp(0, 1)

    @abc.abstractmethod
    def one(self, rgb: np.ndarray, **params) -> np.ndarray:
        """One uint8 RGB image (H, W, 3) at the detect size -> its uint8 map (H, W) or (H, W, 3)."""


class Canny(PerImage):
    name = "canny"

    def one(self, rgb, low_threshold: int = 100, high_threshold: int = 200):
        if low_threshold > high_threshold:
            raise AnnotatorError(f"canny: low_threshold {low_threshold} is above high_threshold {high_threshold}.")
        return cv2.Canny(rgb, low_threshold, high_threshold)


class HoughLines(PerImage):
    """Straight lines drawn white on black, 1 px, as the M-LSD ControlNet expects: probabilistic Hough or LSD."""

    name = "hough_lines"

    def one(self, rgb, method: str = "probabilistic hough", threshold: int = 50, min_line_length: int = 30, max_line_gap: int = 5):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        canvas = np.zeros_like(gray)
        if method == "lsd":
            lines = cv2.createLineSegmentDetector().detect(gray)[0]
            segs = [] if lines is None else lines.reshape(-1, 4)
            segs = [s for s in segs if math.hypot(s[2] - s[0], s[3] - s[1]) >= min_line_length]
        else:
            edges = cv2.Canny(gray, 50, 150)
            lines = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold, minLineLength=min_line_length, maxLineGap=max_line_gap)
            segs = [] if lines is None else lines.reshape(-1, 4)
        for x1, y1, x2, y2 in segs:
            cv2.line(canvas, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), 255, 1)
        return canvas


class ScribbleXDoG(PerImage):
    """Scribbles from a difference of Gaussians (sigmas 0.5 and 5.0), thresholded: white strokes on black."""

    name = "scribble_xdog"

    def one(self, rgb, threshold: int = 32):
        x = rgb.astype(np.float32)
        g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
        g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
        dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
        out = np.zeros(rgb.shape[:2], np.uint8)
        out[2 * (255 - dog.astype(np.int32)) > threshold] = 255
        return out


class ScribbleThreshold(PerImage):
    """A drawing on white paper -> white strokes on black: pixels darker than `threshold` become strokes."""

    name = "scribble_threshold"

    def one(self, rgb, threshold: int = 127):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return np.where(gray < threshold, 255, 0).astype(np.uint8)


class Binary(PerImage):
    """Binarisation (inverse: dark -> white); threshold 0 picks Otsu's threshold per image."""

    name = "binary"

    def one(self, rgb, threshold: int = 0):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        flags = cv2.THRESH_BINARY_INV | (cv2.THRESH_OTSU if threshold == 0 else 0)
        return cv2.threshold(gray, threshold, 255, flags)[1]


class LineartStandard(PerImage):
    """Difference-of-Gaussians line art (ControlNet 1.1 "lineart_standard"): white lines on black."""

    name = "lineart_standard"

    def one(self, rgb, gaussian_sigma: float = 6.0, intensity_threshold: int = 8):
        x = rgb.astype(np.float32)
        g = cv2.GaussianBlur(x, (0, 0), gaussian_sigma)
        intensity = np.min(g - x, axis=2).clip(0, 255)
        above = intensity[intensity > intensity_threshold]
        intensity /= max(16, float(np.median(above)) if above.size else 16)
        intensity *= 127
        return intensity.clip(0, 255).astype(np.uint8)


class ContentShuffle(PerImage):
    """Colour shuffle for shuffle ControlNets: the image warped by a smooth random flow (seeded)."""

    name = "shuffle"
    multiple = 8

    def one(self, rgb, seed: int = 0):
        h, w = rgb.shape[:2]
        rng = np.random.default_rng(seed)
        f = 256
        x = _noise_disk(h, w, f, rng) * float(w - 1)
        y = _noise_disk(h, w, f, rng) * float(h - 1)
        return cv2.remap(rgb, x.astype(np.float32), y.astype(np.float32), cv2.INTER_NEAREST)


def _noise_disk(h: int, w: int, f: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in [0, 1]: random values on a coarse grid, cubic upsampling, crop (ControlNet 1.1's recipe)."""
    noise = rng.uniform(0, 1, size=(h // f + 2, w // f + 2, 1)).astype(np.float32)
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f : f + h, f : f + w]
    noise -= noise.min()
    noise /= max(float(noise.max()), 1e-6)
    return noise


class Tile(PerImage):
    """Tile/blur ControlNet input: downsample `pyramid_levels` times (pyrDown) and blur, then back to size."""

    name = "tile"

    def one(self, rgb, pyramid_levels: int = 1, blur_sigma: float = 0.0):
        h, w = rgb.shape[:2]
        x = rgb
        for _ in range(pyramid_levels):
            x = cv2.pyrDown(x)
        if blur_sigma > 0:
            x = cv2.GaussianBlur(x, (0, 0), blur_sigma)
        return cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)


class Invert(Annotator):
    """1 - x: turns black-on-white line art into the white-on-black that lineart ControlNets expect."""

    name = "invert"

    def annotate(self, images: torch.Tensor, **params) -> torch.Tensor:
        return 1.0 - images


class NormalFromDepth(Annotator):
    """Normal map from a depth map, the ControlNet 1.0 recipe: Sobel gradients and a constant z = `strength`.

    The depth image (near = bright) is used in 0..255 units; pixels with depth below `background_threshold`
    (0..1) get a flat normal. Colours: (n * 127.5 + 127.5), RGB = (x, y, z).
    """

    name = "normal_from_depth"

    def annotate(self, images: torch.Tensor, strength: float = 2 * math.pi, background_threshold: float = 0.1, **params) -> torch.Tensor:
        maps = []
        for d in images.mean(1).cpu().numpy():
            depth = d.astype(np.float32) * 255.0
            x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
            y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
            z = np.full_like(x, strength)
            bg = d < background_threshold
            x[bg] = 0
            y[bg] = 0
            n = np.stack([x, y, z], axis=2)
            n /= np.sum(n**2, axis=2, keepdims=True) ** 0.5
            maps.append((n * 127.5 + 127.5).clip(0, 255).astype(np.uint8))
        return from_uint8(maps, images)


_PALETTE: Optional[torch.Tensor] = None


def ade20k_palette() -> torch.Tensor:
    """The 150 ADE20K colours (RGB uint8), index = class id (0 = wall); no background entry."""
    global _PALETTE
    if _PALETTE is None:
        data = json.loads((Path(__file__).parent / "data" / "ade20k_palette_150.json").read_text())
        _PALETTE = torch.tensor(data, dtype=torch.uint8)
    return _PALETTE


class SegmentationColors(Annotator):
    """A label map (class id = round(value * 255) of the first channel) coloured with the ADE20K palette; ids >= 150 black."""

    name = "seg_colors"

    def annotate(self, images: torch.Tensor, **params) -> torch.Tensor:
        ids = (images[:, 0] * 255.0).round().long()
        pal = torch.cat([ade20k_palette(), torch.zeros(256 - 150, 3, dtype=torch.uint8)]).to(images.device)
        return pal[ids.clamp(0, 255)].permute(0, 3, 1, 2).float() / 255.0


def inpaint_hint(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ControlNet 1.1 inpaint input: the image with masked pixels (mask > 0.5) set to -1.

    images (B,C,H,W) in [0,1]; mask (B,H,W) or (H,W) in [0,1], resized to the image and matched to its batch.
    """
    x = as_rgb(images, "inpaint")
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise AnnotatorError(f"inpaint: mask must be (batch, height, width); got {tuple(mask.shape)}.")
    m = torch.nn.functional.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    if m.shape[0] not in (1, x.shape[0]):
        m = m.repeat(-(-x.shape[0] // m.shape[0]), 1, 1, 1)[: x.shape[0]]
    return torch.where(m.expand_as(x) > 0.5, torch.full_like(x, -1.0), x)


def _simple(key: str, title: str, cls: type, params: list[Param], description: str) -> None:
    register(AnnotatorInfo(key=key, title=title, build=lambda paths, device, dtype, _c=cls: _c(), params=params, description=description,
                           licence="no weights"))


_simple("canny", "Canny edges", Canny, [
    Param("low_threshold", "INT", 100, 1, 255, 1, tooltip="Gradients below this are never edges."),
    Param("high_threshold", "INT", 200, 1, 255, 1, tooltip="Gradients above this are always edges."), RES],
    "OpenCV Canny edges, white on black, for canny ControlNets.")
_simple("hough_lines", "Straight lines (Hough / LSD)", HoughLines, [
    Param("method", "COMBO", "probabilistic hough", choices=("probabilistic hough", "lsd"), tooltip="OpenCV probabilistic Hough on Canny edges, or the LSD line segment detector."),
    Param("threshold", "INT", 50, 1, 500, 1, tooltip="Hough accumulator votes a line needs."),
    Param("min_line_length", "INT", 30, 0, 2000, 1, tooltip="Shorter segments are dropped (pixels, at detect resolution)."),
    Param("max_line_gap", "INT", 5, 0, 200, 1, tooltip="Gaps up to this many pixels are bridged."), RES],
    "Straight line segments drawn 1 px white on black, as M-LSD ControlNets expect; no weights needed.")
_simple("scribble_xdog", "Scribble (XDoG)", ScribbleXDoG, [
    Param("threshold", "INT", 32, 1, 64, 1, tooltip="Lower keeps more strokes."), RES], "Fake scribbles from a difference of Gaussians.")
_simple("scribble_threshold", "Scribble (threshold)", ScribbleThreshold, [
    Param("threshold", "INT", 127, 1, 254, 1, tooltip="Pixels darker than this become strokes."), RES], "A drawing on paper made into white-on-black scribbles.")
_simple("binary", "Binary", Binary, [
    Param("threshold", "INT", 0, 0, 255, 1, tooltip="0 = Otsu's automatic threshold."), RES], "Dark parts become white, the rest black.")
_simple("lineart_standard", "Lineart (standard, DoG)", LineartStandard, [
    Param("gaussian_sigma", "FLOAT", 6.0, 0.1, 50.0, 0.1, tooltip="Blur of the difference of Gaussians."),
    Param("intensity_threshold", "INT", 8, 0, 255, 1, tooltip="Weaker responses do not set the contrast normalisation."), RES],
    "Line art without a network (ControlNet 1.1 lineart_standard).")
_simple("shuffle", "Content shuffle", ContentShuffle, [
    Param("seed", "INT", 0, 0, 2**31 - 1, 1, tooltip="Seed of the random flow field."), RES], "Shuffles the image's content for shuffle ControlNets.")
_simple("tile", "Tile (blur/downsample)", Tile, [
    Param("pyramid_levels", "INT", 1, 0, 6, 1, tooltip="How many times to halve the resolution."),
    Param("blur_sigma", "FLOAT", 0.0, 0.0, 20.0, 0.1, tooltip="Extra Gaussian blur."), RES], "A blurred, downsampled image for tile ControlNets.")
_simple("invert", "Invert", Invert, [], "1 - image: black-on-white line art to white-on-black.")
_simple("normal_from_depth", "Normal map from depth", NormalFromDepth, [
    Param("strength", "FLOAT", 2 * math.pi, 0.1, 100.0, 0.1, tooltip="The constant z of the normal: larger = flatter."),
    Param("background_threshold", "FLOAT", 0.1, 0.0, 1.0, 0.01, tooltip="Depth below this (0..1) is background with a flat normal.")],
    "Normals from any depth map (near = bright), the ControlNet 1.0 recipe.")
_simple("seg_colors", "Segmentation colours (ADE20K)", SegmentationColors, [],
        "A class-id label map (id = value x 255) coloured with the ADE20K palette of the seg ControlNets.")
