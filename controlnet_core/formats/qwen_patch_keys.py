"""DiffSynth's blockwise Qwen-Image ControlNet files (ComfyUI loads them with `ModelPatchLoader` from
`models/model_patches`): detection, sizes from shapes, load and save. The keys are our parameter names."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..checkpoint import TensorSource
from ..errors import CheckpointError, ControlNetError
from ..loading import LoadedControl, LoadOptions, finish_load, float_reader, strict_fill
from ..qwen.blockwise import QwenBlockwiseConfig, QwenBlockwiseControlNet
from ..qwen.config import LATENT_CHANNELS, PATCH
from .record import Format
from .shapes import compute_dtype, save_state_dict

log = logging.getLogger(__name__)
SIGNATURE = ("img_in.weight", "controlnet_blocks.0.x_rms.weight", "controlnet_blocks.0.y_rms.weight", "controlnet_blocks.0.input_proj.weight")
_BLOCK = re.compile(r"^controlnet_blocks\.(\d+)\.")


def is_qwen_blockwise(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return all(k in keys for k in SIGNATURE)


def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> QwenBlockwiseConfig:
    hidden, features = (int(d) for d in shapes["img_in.weight"])
    if features % (PATCH * PATCH) or features // (PATCH * PATCH) < LATENT_CHANNELS:
        raise CheckpointError(f"'img_in.weight' takes {features} features; expected 4 x (16 latent channels, plus 1 for inpainting).")
    found = {int(m[1]) for k in shapes if (m := _BLOCK.match(k))}
    n = max(found) + 1
    if len(found) != n:
        raise CheckpointError(f"'controlnet_blocks' are numbered up to {n - 1}, but some are missing; the file is damaged.")
    for i in range(n):
        for name, shape in ((f"controlnet_blocks.{i}.x_rms.weight", (hidden,)), (f"controlnet_blocks.{i}.y_rms.weight", (hidden,)),
                            (f"controlnet_blocks.{i}.input_proj.weight", (hidden, hidden)), (f"controlnet_blocks.{i}.output_proj.weight", (hidden, hidden))):
            if name not in shapes or tuple(shapes[name]) != shape:
                raise CheckpointError(f"'{name}' has shape {list(shapes[name]) if name in shapes else 'none'}; expected {list(shape)} (the model's width).")
    try:
        return QwenBlockwiseConfig(hidden_size=hidden, num_layers=n, extra_channels=features // (PATCH * PATCH) - LATENT_CHANNELS)
    except ControlNetError as e:
        raise CheckpointError(f"the tensor shapes describe no valid blockwise ControlNet ({e})") from None


def load(source: TensorSource, options: LoadOptions) -> LoadedControl:
    keys = list(source.keys())
    config = config_from_shapes({k: source.shape(k) for k in keys})
    dtype = compute_dtype(source.stored_dtype("img_in.weight"), options.dtype)
    with torch.device("meta"):
        model = QwenBlockwiseControlNet(config, dtype=dtype)
    read = float_reader(model, source, dtype, options.keep_fp8)
    strict_fill(model, lambda k: read(k, k), set(keys), source.name, FORMAT.name)
    finish_load(model, options, dtype)
    log.info("loaded %s as '%s': %s", source.name, FORMAT.name, config.summary())
    return LoadedControl(model, FORMAT.name, source.name)


def save(model: QwenBlockwiseControlNet, path: Path, dtype: Optional[torch.dtype], overwrite: bool) -> Path:
    return save_state_dict(model, path, dtype, overwrite)


FORMAT = Format("qwen-diffsynth", "Qwen-Image blockwise ControlNet (DiffSynth canny / depth / inpaint; a model patch: MODEL in, MODEL out)",
                SIGNATURE, is_qwen_blockwise, load, save, kind="qwen_patch", takes_latent_hint=True,
                inference_dtypes=("bfloat16", "float32"))
