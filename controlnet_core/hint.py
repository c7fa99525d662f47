"""Preparing a condition image for a latent: resize modes, channel count, batch, and region masks.

Images are (B, C, H, W) in [0, 1]; masks (B, H, W) or (H, W) in [0, 1].
"""
from __future__ import annotations

import logging
from enum import Enum
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import ControlNetError, LimitExceededError
from .limits import megapixel_limit
from .residuals import ControlResiduals

log = logging.getLogger(__name__)


class ResizeMode(str, Enum):
    STRETCH = "stretch"  # ignore the aspect ratio
    CROP = "crop and resize"  # cover the target, crop the overflow (centred); ComfyUI's built-in behaviour
    PAD = "resize and pad"  # fit inside the target, pad the rest with black

    @classmethod
    def parse(cls, value: "str | ResizeMode") -> "ResizeMode":
        if isinstance(value, ResizeMode):
            return value
        for m in cls:
            if value in (m.value, m.name, m.name.lower()):
                return m
        raise ValueError(f"unknown resize mode {value!r}; expected one of {[m.value for m in cls]}")


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale -> repeated RGB; RGBA -> RGB over black (alpha premultiplied); RGB -> 1 channel by mean."""
    c = image.shape[1]
    if c == channels:
        return image
    if c == 4:
        image = image[:, :3] * image[:, 3:4]
        c = 3
    if c == 2:  # gray + alpha
        image = image[:, :1] * image[:, 1:2]
        c = 1
    if c == channels:
        return image
    if c == 1:
        return image.expand(-1, channels, -1, -1)
    if channels == 1:
        return image.mean(1, keepdim=True)
    raise ControlNetError(f"hint image has {image.shape[1]} channels; cannot make the {channels} the control model expects.")


def resize(image: torch.Tensor, height: int, width: int, mode: "str | ResizeMode" = ResizeMode.CROP, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize (B, C, H, W) to (height, width) keeping the aspect ratio as `mode` says."""
    mode = ResizeMode.parse(mode)
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    kw = {"align_corners": False, "antialias": True} if interpolation in ("bilinear", "bicubic") else {}
    if mode is ResizeMode.STRETCH:
        return F.interpolate(image, size=(height, width), mode=interpolation, **kw)
    if mode is ResizeMode.CROP:
        s = max(height / h, width / w)
    else:
        s = min(height / h, width / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = F.interpolate(image, size=(nh, nw), mode=interpolation, **kw)
    if mode is ResizeMode.CROP:
        top, left = (nh - height) // 2, (nw - width) // 2
        return out[..., top : top + height, left : left + width]
    pad_t, pad_l = (height - nh) // 2, (width - nw) // 2
    return F.pad(out, (pad_l, width - nw - pad_l, pad_t, height - nh - pad_t), value=0.0)


def match_batch(t: torch.Tensor, batch: int, what: str = "hint", batched_number: int = 1) -> torch.Tensor:
    """1 -> broadcast; more -> first `batch`; fewer -> cycled (with a warning): one item per latent.

    batched_number: the latent batch holds that many equal chunks (e.g. cond and uncond batched
    together by the sampler); items are matched per chunk and the chunks tiled.
    """
    if batched_number > 1 and batch % batched_number == 0:
        per = match_batch(t, batch // batched_number, what)
        return per.repeat(batched_number, *([1] * (t.ndim - 1)))
    n = t.shape[0]
    if n == batch:
        return t
    if n == 1:
        return t.expand(batch, *t.shape[1:])
    if n > batch:
        log.warning("%s batch %d is larger than the latent batch %d: using the first %d", what, n, batch, batch)
        return t[:batch]
    if batch % n:
        log.warning("%s batch %d does not divide the latent batch %d: repeating it cyclically", what, n, batch)
    reps = -(-batch // n)
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch]


# Hint bounds (megapixels). Why: the hint is made at the latent's pixel size (8x its side) for every image of the
# sampler's batch, and the control model's first layers run at that size (SD ControlNets: about 100 bytes per pixel in
# fp32). An EmptyLatentImage of 16384 x 16384 would ask for a 3.2 GB hint and tens of GB of activations; on a CPU the
# kernel's OOM killer then takes the whole ComfyUI process instead of raising.
_MP_8192 = 8192 * 8192 / 1e6
HINT_LIMITS = (("CNS_MAX_HINT_MEGAPIXELS", _MP_8192, "per image"), ("CNS_MAX_HINT_BATCH_MEGAPIXELS", 2 * _MP_8192, "per sampling call"))


def check_hint_size(height: int, width: int, batch: int, who: str = "hint") -> None:
    """Refuse, before any allocation, a hint above the per-image or per-call megapixel limit, saying what to change."""
    per_image = height * width / 1e6
    for (var, default, scope), needed in zip(HINT_LIMITS, (per_image, per_image * batch)):
        limit = megapixel_limit(var, default)
        if needed > limit:
            raise LimitExceededError(
                f"{who}: sampling at {width}x{height} pixels with {batch} image(s) per model call needs the hint at that size, "
                f"{needed:.1f} megapixels {scope}, above the limit of {limit:.4g}. Sample smaller and upscale (or tile), use a "
                f"smaller batch, or raise the limit with the environment variable {var} (memory permitting).")


def prepare_hint(image: torch.Tensor, height: int, width: int, channels: int, batch: int, mode: "str | ResizeMode" = ResizeMode.CROP, batched_number: int = 1) -> torch.Tensor:
    """A (B, C, H, W) [0, 1] image made into exactly what a control model takes."""
    check_hint_size(height, width, batch)
    if image.ndim != 4:
        raise ControlNetError(f"hint image must be (batch, channels, height, width); got shape {tuple(image.shape)}.")
    if image.shape[0] == 0:
        raise ControlNetError("hint image batch is empty.")
    image = to_channels(image.float(), channels)
    image = resize(image, height, width, mode)
    return match_batch(image, batch, "hint", batched_number)  # not clamped: inpaint hints mark masked pixels with -1


def mask_residuals(res: ControlResiduals, mask: Optional[torch.Tensor], batched_number: int = 1, cache: Optional[dict] = None) -> ControlResiduals:
    """Multiply every residual by the mask resized (area-averaged) to its own resolution; None = everywhere.

    Token residuals (`res.token_grid` set) get one value per token: the mask's mean over the token's patch.

    `cache`: a dict the caller keeps across sampling steps, so each site's resized mask is made once.
    """
    if mask is None:
        return res
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ControlNetError(f"mask must be (batch, height, width) or (height, width); got shape {tuple(mask.shape)}.")
    m = mask[:, None].float()
    cache = {} if cache is None else cache
    grid = res.token_grid

    def resized(t: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        # only the masks match_batch will use: a long mask batch (video) is not resized whole for one latent chunk
        per = t.shape[0] // batched_number if batched_number > 1 and t.shape[0] % batched_number == 0 else t.shape[0]
        kw = dict(align_corners=False, antialias=True) if mode == "bilinear" else {}
        r = F.interpolate(m[:per].to(t.device), size=size, mode=mode, **kw)
        return match_batch(r, t.shape[0], "mask", batched_number).to(t.dtype)

    def apply(t: torch.Tensor) -> torch.Tensor:
        if grid is not None:  # DiT tokens (B, rows * columns, C), row-major over the latent's patches
            rows, cols = grid
            if t.ndim != 3 or t.shape[1] != rows * cols:
                raise ControlNetError(f"a token residual has shape {list(t.shape)}; a mask over a {rows}x{cols} token grid needs "
                                      f"[batch, {rows * cols}, channels].")
            key = ("tokens", t.shape[0], rows, cols, t.device, t.dtype, batched_number)
            if key not in cache:
                # each token gets the mask's mean over its patch: a region edge on a patch edge stays sharp
                cache[key] = resized(t, (rows, cols), "area").flatten(2).transpose(1, 2)  # (B, rows * cols, 1)
            return t * cache[key]
        key = (t.shape[0], t.shape[-2], t.shape[-1], t.device, t.dtype, batched_number)
        if key not in cache:
            cache[key] = resized(t, tuple(t.shape[-2:]))
        return t * cache[key]

    return res.map(apply)
