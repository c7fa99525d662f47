"""`load_control`: any supported file (or in-memory state dict) -> a ready control model.

The layout is found by asking each `formats.REGISTRY` record in turn; the record loads it. What all loads share
(sources, strict filling, the result type) is in `loading.py`.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch

from . import formats
from .checkpoint import TensorSource
from .errors import ControlNetError, NotACheckpointError, UnknownLayoutError
from .loading import LoadedControl, LoadOptions, StateDictLike, as_source
from .unet_load import METADATA_CONFIG, METADATA_GAP

__all__ = ["load_control", "LoadedControl", "LoadOptions", "StateDictLike", "as_source", "METADATA_CONFIG", "METADATA_GAP"]


def _control_source(obj: StateDictLike) -> TensorSource:
    """`as_source`, plus a diffusers ControlNet folder (config.json + diffusion_pytorch_model weights) given as a whole."""
    if isinstance(obj, (str, os.PathLike)) and Path(obj).is_dir():
        folder = Path(obj)
        if not (folder / "config.json").is_file():
            raise NotACheckpointError(
                f"{folder}: is a folder without a config.json; expected a ControlNet or T2I-Adapter file (.safetensors, .pth, "
                ".ckpt, .bin) or a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)."
            )
        from .base_models.locate import component_weights  # the diffusers file-name conventions live there

        return component_weights(folder)
    return as_source(obj)


@contextlib.contextmanager
def _naming(name: str):
    """Every `ControlNetError` leaving a load names the file: one raised deep down (a key table, a config) gets the
    name put in front, keeping its class."""
    try:
        yield
    except ControlNetError as e:
        if name in str(e):
            raise
        raise type(e)(f"{name}: {e}") from None


def load_control(
    checkpoint: StateDictLike,
    *,
    base_unet: Optional[StateDictLike] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    global_average_pooling: Optional[bool] = None,
    diffusers_config: Optional[Union[dict, str, os.PathLike]] = None,
    num_heads: Optional[int] = None,
    num_head_channels: Optional[int] = None,
    keep_fp8: bool = False,
) -> LoadedControl:
    """Load any supported control checkpoint (ControlNet, T2I-Adapter, SD3 / SD3.5 ControlNet); the layout is detected from its keys.

    base_unet: the base model's UNet weights (bare ldm keys, or a full checkpoint with
        `model.diffusion_model.*`), needed by "diff" ControlNets and control-LoRAs.
    dtype: compute dtype of the returned model (default: the stored dtype; bf16 for fp8 files), or a function
        (format record, dtype of the file's largest float tensor) -> compute dtype, for callers whose choice depends
        on the family (a host's supported dtypes).
    keep_fp8: fp8-stored Linear / Conv2d weights of the DiT families stay fp8 in memory and are cast to the compute
        dtype as each layer runs, as ComfyUI runs fp8 ControlNets (half the memory of bf16; exact same outputs).
    global_average_pooling: shuffle models; None detects it (metadata, diffusers config, file name).
    diffusers_config: a diffusers config.json (dict or path); by default one next to the file is used.

    Every bad input raises a `ControlNetError` subclass whose message names the file (see `errors.py`).
    """
    source = _control_source(checkpoint)
    with _naming(source.name):
        fmt = formats.find_format(source.keys())
        if fmt is None:
            raise _unknown(source)
        if callable(dtype):
            dtype = dtype(fmt, _main_dtype(source))
        options = LoadOptions(base_unet, dtype, device, global_average_pooling, diffusers_config, num_heads, num_head_channels, keep_fp8)
        return fmt.load(source, options)


def _main_dtype(source: TensorSource) -> torch.dtype:
    """The stored dtype of the largest floating-point tensor: what "the file's dtype" means when norms and biases are
    kept wider than the fp8 weights."""
    best, size = torch.float32, -1
    for k in source.keys():
        dtype = source.stored_dtype(k)
        if dtype.is_floating_point and (n := math.prod(source.shape(k))) > size:
            best, size = dtype, n
    return best


def _unknown(source: TensorSource) -> UnknownLayoutError:
    keys = set(source.keys())
    best, score = formats.closest_format(keys)
    sample = sorted(keys)[:5]
    return UnknownLayoutError(
        f"{source.name}: not a ControlNet or T2I-Adapter layout this library knows ({len(keys)} tensors, e.g. {sample}). "
        f"Closest known layout: '{best}' ({formats.FORMATS[best]}; {score:.0%} of its signature modules present). "
        f"Supported: {', '.join(formats.FORMATS)}."
    )
