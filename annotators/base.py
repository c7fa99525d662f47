"""What every annotator is: images (B, C, H, W) in [0, 1] in, condition maps (B, C', H, W) in [0, 1] out.

Input is normalised here once, so each annotator can assume a clean RGB float batch:
1 channel -> repeated, RGBA -> composited on black, NaN/inf -> 0, values clamped to [0, 1].
uint8 batches (what OpenCV and PIL users hold) are read as 0..255; the OpenCV annotators take them as they are.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import os
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.nn.functional as F

from . import heap
from ._core import ControlNetError

log = logging.getLogger(__name__)


class AnnotatorError(ControlNetError):
    """Bad input to an annotator (empty batch, wrong shape...)."""


def as_rgb(images: torch.Tensor, what: str = "annotator", sanitize: bool = True, keep_uint8: bool = False) -> torch.Tensor:
    """Validate and normalise a (B, C, H, W) batch to float RGB in [0, 1].

    `sanitize=False` skips the NaN/range pass (a full read of the batch) for callers whose next step
    saturates anyway, such as the uint8 conversion of the OpenCV annotators. `keep_uint8=True` returns an
    RGB uint8 batch unconverted, because OpenCV wants uint8 and a float round trip would cost more than
    cv2.Canny itself; other uint8 batches are scaled from 0..255 to [0, 1].
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AnnotatorError(f"{what}: expected an image batch (batch, channels, height, width); got {shape}.")
    if images.shape[0] == 0:
        raise AnnotatorError(f"{what}: the image batch is empty; connect at least one image.")
    if 0 in images.shape[2:]:
        raise AnnotatorError(f"{what}: image of size {tuple(images.shape[2:])} has no pixels.")
    if images.dtype == torch.uint8:
        if keep_uint8 and images.shape[1] == 3:
            return images
        x = images.float().div_(255.0)
    elif images.dtype == torch.bool:
        x = images.float()
    elif not images.is_floating_point():
        raise AnnotatorError(f"{what}: images of dtype {images.dtype}; expected float in [0, 1] (ComfyUI's IMAGE) or uint8 0..255.")
    else:
        x = images.float()
    c = x.shape[1]
    if c == 4:
        x = x[:, :3] * x[:, 3:4]
    elif c == 2:
        x = (x[:, :1] * x[:, 1:2]).expand(-1, 3, -1, -1)
    elif c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c != 3:
        raise AnnotatorError(f"{what}: images have {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    return sanitized(x) if sanitize else x


def sanitized(x: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, +inf -> 1, -inf -> 0, everything clamped to [0, 1]; a no-copy check when already clean."""
    lo, hi = torch.aminmax(x)  # one pass; NaN makes both comparisons false
    if not (lo >= 0 and hi <= 1):
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return x


def resize_to(images: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    if tuple(images.shape[-2:]) == (height, width):
        return images
    kw = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(images, size=(height, width), mode=mode, **kw)


def detect_size(height: int, width: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Scale so the short side is `resolution`, rounded to `multiple` (as the ControlNet 1.1 annotators do)."""
    k = resolution / min(height, width)
    h = max(multiple, int(round(height * k / multiple)) * multiple)
    w = max(multiple, int(round(width * k / multiple)) * multiple)
    return h, w


# Work bounds (megapixels). Why: the detect size follows the short side, so an extreme aspect ratio or a huge
# `resolution` asks for unbounded memory (a 1x3000 image at 512 is 512 x 1,536,000 px, 9.4 GB as float RGB), and the
# kernel's OOM killer then takes the whole ComfyUI process. Networks hold dozens of full-size activations per image,
# OpenCV recipes a few, hence two per-image limits; a chunk (images per call) never holds more than one limit's worth.
MAX_MEGAPIXELS_NETWORK = float(os.environ.get("CNS_MAX_DETECT_MEGAPIXELS_NETWORK", "4.2"))  # 2048 x 2048
MAX_MEGAPIXELS_CLASSICAL = float(os.environ.get("CNS_MAX_DETECT_MEGAPIXELS", "16.8"))  # 4096 x 4096


def detect_limit(network: bool) -> float:
    return MAX_MEGAPIXELS_NETWORK if network else MAX_MEGAPIXELS_CLASSICAL


def check_detect_size(who: str, height: int, width: int, resolution: int, detect: tuple[int, int], network: bool) -> None:
    """Refuse, before any allocation, a detect size above the per-image limit, saying what to change."""
    dh, dw = detect
    mp, limit = dh * dw / 1e6, detect_limit(network)
    if mp > limit:
        var = "CNS_MAX_DETECT_MEGAPIXELS_NETWORK" if network else "CNS_MAX_DETECT_MEGAPIXELS"
        raise AnnotatorError(
            f"{who}: a {width}x{height} image at resolution {resolution} would be annotated at {dw}x{dh} ({mp:.1f} megapixels), "
            f"above the limit of {limit:g} megapixels per image for this annotator. Lower 'resolution', crop or pad the image "
            f"to a less extreme aspect ratio, or raise the limit with the environment variable {var} (memory permitting).")


def bounded_chunk_size(requested: int, detect: tuple[int, int], network: bool) -> int:
    """Images per call, at most `requested`, so that one call never holds more than one per-image limit's pixels."""
    per_image = detect[0] * detect[1] / 1e6
    return max(1, min(requested, int(detect_limit(network) // max(per_image, 1e-9))))


def chunks(images: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, images.shape[0], max(1, size)):
        yield images[i : i + size]


T = TypeVar("T")


def map_chunks(fn: Callable[[torch.Tensor], T], images: torch.Tensor, chunk_size: int,
               progress: Optional[Callable[[int], None]] = None) -> list[T]:
    """The chunk-and-progress loop of every annotator call: `fn` on each run of at most `chunk_size` images of the
    batch, in order, then `progress(images in that chunk)`; the results as a list. (`Annotator.run` is its one
    user for maps: `__call__`, OpenPose's `detect` and the ComfyUI nodes all go through it.)"""
    out = []
    for part in chunks(images, chunk_size):
        out.append(fn(part))
        if progress is not None:
            progress(part.shape[0])
    return out


def cat_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """One batch from per-chunk maps; a single chunk is returned as it is (cat would materialise expanded 3-channel
    views, and copy); cat keeps a channels-last layout."""
    return maps[0] if len(maps) == 1 else torch.cat(maps, 0)


def default_chunk_size(device: torch.device | str | None) -> int:
    """Images per network call when the caller does not say: 1 on a CPU, 8 on an accelerator.

    Why: on a CPU a bigger batch adds no parallelism (oneDNN already spreads one image over every core) and its
    activations no longer fit the caches; on 2 cores at 512x512, one image per call was up to 1.5x faster than
    eight in fp32 and up to 1.7x in bf16 (bench/RESULTS.md). A GPU needs the batch to be kept busy.
    """
    return 1 if device is None or torch.device(device).type == "cpu" else 8


class Annotator(abc.ABC):
    """Callable annotator: `__call__(images (B,C,H,W) in [0,1]) -> (B,C',H,W) in [0,1]`, same H, W as the input."""

    name: str = "annotator"
    sanitizes_input: bool = False  # True: annotate() copes with NaN / out-of-range values itself
    accepts_uint8: bool = False  # True: annotate() also takes an RGB uint8 batch (0..255) as it is
    whole_batch: bool = False  # True: __call__ hands annotate() the whole batch unless told a chunk size

    @abc.abstractmethod
    def annotate(self, images: torch.Tensor, **params) -> torch.Tensor:
        """Clean RGB batch (B, 3, H, W) in [0, 1] -> condition maps (B, C, H, W) in [0, 1], same H and W."""

    def annotate_chunk(self, images: torch.Tensor, **params) -> tuple[torch.Tensor, Optional[list]]:
        """One clean chunk -> (maps, one extra result per image, or None): `annotate` and no extras by default;
        OpenPose adds each image's keypoints."""
        return self.annotate(images, **params), None

    def __call__(self, images: torch.Tensor, chunk_size: Optional[int] = None, progress: Optional[Callable[[int], None]] = None,
                 **params) -> torch.Tensor:
        """chunk_size: images per `annotate` call; default: `default_chunk_size` of a network's device, and the
        whole batch for annotators without a network (they work image by image anyway). progress(n) is called after
        each chunk of n images."""
        x = as_rgb(images, self.name, sanitize=not self.sanitizes_input, keep_uint8=self.accepts_uint8)
        return self.run(x, chunk_size=chunk_size, progress=progress, **params)[0]

    def run(self, images: torch.Tensor, *, chunk_size: Optional[int] = None, progress: Optional[Callable[[int], None]] = None,
            prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **params) -> tuple[torch.Tensor, Optional[list]]:
        """The chunk-and-progress loop behind `__call__`, OpenPose's `detect` and the ComfyUI nodes: (maps, extras).

        images: a batch the caller has already normalised (`as_rgb`). Each chunk of at most chunk_size images (default
        as in `__call__`) goes through `prepare` (the nodes: resize to the detect size, move to the network's device),
        then `annotate_chunk`; its maps come back on the device of `images` (so a long batch never piles up on an
        accelerator) and progress(n) is called. extras: the per-image extras of every chunk in order (OpenPose's
        keypoints), or None.
        """
        device = getattr(self, "device", None)
        if chunk_size is None:
            chunk_size = default_chunk_size(device) if device is not None and not self.whole_batch else images.shape[0]

        def one(part: torch.Tensor) -> tuple[torch.Tensor, Optional[list]]:
            maps, extras = self.annotate_chunk(prepare(part) if prepare is not None else part, **params)
            return maps.to(images.device), extras

        # a network on a CPU: its large activations are reused from image to image instead of page-faulted anew
        on_cpu = device is not None and torch.device(device).type == "cpu"
        with heap.reuse_large_blocks() if on_cpu else contextlib.nullcontext():
            results = map_chunks(one, images, chunk_size, progress)
        maps = cat_maps([m for m, _ in results])
        extras = None if all(e is None for _, e in results) else [e for _, es in results for e in es or ()]
        return maps, extras


class NetworkAnnotator(Annotator):
    """An annotator whose work is done by torch networks built from weight files.

    `networks(**params)` lists, explicitly, the networks that a call with these annotate() parameters runs: the node
    layer hands exactly these to ComfyUI's memory manager, which moves them between the GPU and the offload device.
    `device` and `dtype` are read from the first network's parameters, so they follow such moves.
    """

    @abc.abstractmethod
    def networks(self, **params) -> list[torch.nn.Module]:
        """The networks a call with these annotate() keyword arguments runs (any loaded on first use is loaded now)."""

    def _first_parameter(self) -> torch.Tensor:
        for net in self.networks():
            for p in net.parameters():
                return p
        raise AnnotatorError(f"{self.name}: its networks have no parameters, so they have no device or dtype.")

    @property
    def device(self) -> torch.device:
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def attach_weights(self, paths: dict[str, os.PathLike]) -> None:
        """Take weight files (manifest name -> verified path) that the annotator was built without because no call
        needed them yet (`AnnotatorInfo.switched_weights`). Annotators without such files refuse."""
        raise AnnotatorError(f"{self.name}: takes all its weight files when it is built; cannot add {sorted(paths)} afterwards.")


class SingleNetworkAnnotator(NetworkAnnotator):
    """A network annotator with one network, `self.model`, loaded strictly from one weight file by `from_file`.

    Subclasses name the architecture (`network`, built without arguments) and what the file must be (`model_name`,
    used in errors); `prepare` may rewrite the loaded float32 network before it is cast and frozen (M-LSD folds its
    batch norms there).
    """

    network: type[torch.nn.Module]  # the architecture from_file builds
    model_name: str = "network"  # what the weight file must hold, for error messages
    strip_prefixes: tuple[str, ...] = ("module.",)  # removed from every key when all keys carry it
    channels_last: bool = True  # convolutional networks: see inference_network; transformers keep NCHW

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def networks(self, **params) -> list[torch.nn.Module]:
        return [self.model]

    @classmethod
    def prepare(cls, model: torch.nn.Module) -> torch.nn.Module:
        """The loaded network (float32, strict weights) before it is moved, cast and frozen; unchanged by default."""
        return model

    @classmethod
    def load_model(cls, path: os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Read `path` safely, load it strictly into `cls.network()`, `prepare` it and freeze it on device/dtype.

        A file that is no weight file at all (an HTML page, a Git LFS pointer, a truncated download) raises the same
        `AnnotatorWeightsError` as a file of another network, naming the file and what was expected."""
        from . import weights

        try:
            sd = weights.load_state_dict(path, strip_prefixes=cls.strip_prefixes)
        except weights.AnnotatorWeightsError:
            raise
        except ControlNetError as e:
            raise weights.AnnotatorWeightsError(f"{e} Expected the {cls.model_name} weights.") from None
        model = cls.prepare(weights.load_into(cls.network(), sd, path, cls.model_name))
        if cls.channels_last:
            model = inference_network(model, device, dtype)
        else:
            model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        log.debug("%s: loaded %s on %s (%s)", cls.name, path, device, dtype)
        return model

    @classmethod
    def from_file(cls, path: os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The annotator with its network loaded from `path` (see `load_model`) on device/dtype."""
        return cls(cls.load_model(path, device=device, dtype=dtype))


def inference_network(module: torch.nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Frozen, eval-mode network on device/dtype in the channels-last layout.

    oneDNN (CPU) and cuDNN pick their fastest convolution kernels for NHWC weights and activations
    (on CPUs with AMX, bf16 convolutions run several times faster than in NCHW); the layout then
    propagates from layer to layer. Only for convolutional networks: `.view` on NHWC activations fails.
    """
    return module.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def fold_batch_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in a Sequential into that convolution.

    Why: at inference a batch norm is a per-channel scale and shift, which the convolution's weights and bias can
    absorb; left alone, each one is another full pass over an activation (on a 2-core CPU, 13% of M-LSD's time).
    The folded network computes the same function up to float rounding. Only for networks about to be frozen: the
    module is changed in place (BatchNorm2d -> Identity) and no longer loads its checkpoint's keys. Fold in float32,
    before casting to a lower precision.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in [m for m in module.modules() if isinstance(m, torch.nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = torch.nn.Identity()
    return module


def network_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The network's input on its device and dtype, channels-last to match `inference_network`."""
    return x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
