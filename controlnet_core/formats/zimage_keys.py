"""alibaba-pai's Z-Image Fun ControlNet files ("Z-Image-Turbo-Fun-Controlnet-Union" 1, 2.0, 2.1; ComfyUI loads them
with `ModelPatchLoader` from `models/model_patches`): detection, sizes from shapes, load and save.

Layout: the file on disk, the one ComfyUI's `z_image_convert` reads (and diffusers' `ZImageControlNetModel` state dict,
key for key): `control_all_x_embedder.2-1.{weight,bias}`, `control_layers.{j}.` and `control_noise_refiner.{i}.`
blocks with separate `attention.to_q/to_k/to_v`, `attention.to_out.0`, `attention.norm_q/norm_k`, `feed_forward.w1/w2/w3`,
`attention_norm1/2`, `ffn_norm1/2`, `adaLN_modulation.0`, plus `before_proj` (first block of a chain) and `after_proj`
(every control block). ComfyUI fuses q/k/v into `qkv` and renames `to_out.0` / `norm_q` / `norm_k` only in memory; our
parameter names are the file's keys, so loading and saving are one to one.

The published 2.0 file's `control_noise_refiner.0.after_proj.weight` is all zeros (its refiner-control layers were
never trained). Detected as ComfyUI detects it, and handled as ComfyUI does: the refiner outputs come from the main
control layers (`ZImageFunConfig.refiner_source`); the weights stay loaded, so a saved file is the same layout.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..checkpoint import TensorSource
from ..errors import CheckpointError, ControlNetError
from ..loading import LoadedControl, LoadOptions, finish_load, float_reader, strict_fill
from ..zimage.config import ADALN_MAX, EMBEDDER_KEY, LATENT_CHANNELS, PATCH, REFINER_FROM_CONTROL_LAYERS, ZImageFunConfig
from ..zimage.model import ZImageFunControlNet
from .record import Format
from .shapes import compute_dtype, count_blocks, expect, save_state_dict, shape_of

log = logging.getLogger(__name__)
EMBEDDER = f"control_all_x_embedder.{EMBEDDER_KEY}.weight"  # ComfyUI's and diffusers' detection key
SIGNATURE = (EMBEDDER, "control_layers.0.before_proj.weight", "control_layers.0.after_proj.weight", "control_layers.0.attention.to_q.weight")
ZERO_REFINER = "control_noise_refiner.0.after_proj.weight"  # all zeros in the published 2.0 file
INPAINT_CHANNELS = 2 * LATENT_CHANNELS + 1  # 2.x: control latent, keep mask, inpaint latent
_NEEDS = "a Z-Image Fun ControlNet"


def is_zimage_fun(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return all(k in keys for k in SIGNATURE)


def _check_block(shapes: Mapping[str, Sequence[int]], prefix: str, cfg: ZImageFunConfig, first: bool, control: bool) -> None:
    """Every tensor of one block at the shape the sizes read off block 0 of `control_layers` say."""
    d, h, f, a = cfg.dim, cfg.head_dim, cfg.ffn_dim, cfg.adaln_dim
    wanted = {"attention.to_q.weight": (d, d), "attention.to_k.weight": (d, d), "attention.to_v.weight": (d, d),
              "attention.to_out.0.weight": (d, d), "attention.norm_q.weight": (h,), "attention.norm_k.weight": (h,),
              "feed_forward.w1.weight": (f, d), "feed_forward.w2.weight": (d, f), "feed_forward.w3.weight": (f, d),
              "attention_norm1.weight": (d,), "ffn_norm1.weight": (d,), "attention_norm2.weight": (d,), "ffn_norm2.weight": (d,),
              "adaLN_modulation.0.weight": (4 * d, a), "adaLN_modulation.0.bias": (4 * d,)}
    if control:
        wanted.update({"after_proj.weight": (d, d), "after_proj.bias": (d,)})
        if first:
            wanted.update({"before_proj.weight": (d, d), "before_proj.bias": (d,)})
    for name, shape in wanted.items():
        expect(shapes, f"{prefix}.{name}", shape, f"width {d}, heads of {h}, feed-forward {f}, adaLN input {a}", _NEEDS)


def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> ZImageFunConfig:
    """Sizes from the file's shapes; the refiner source is REFINER_OWN here (`load` looks at the values)."""
    dim, features = shape_of(shapes, EMBEDDER, 2, _NEEDS)
    if features % (PATCH * PATCH) or features // (PATCH * PATCH) not in (LATENT_CHANNELS, INPAINT_CHANNELS):
        raise CheckpointError(f"'{EMBEDDER}' takes {features} features; expected {PATCH * PATCH} x {LATENT_CHANNELS} (version 1) "
                              f"or {PATCH * PATCH} x {INPAINT_CHANNELS} (2.x: control latent, keep mask, inpaint latent).")
    hint_channels = features // (PATCH * PATCH)
    (head_dim,) = shape_of(shapes, "control_layers.0.attention.norm_q.weight", 1, _NEEDS)
    ffn_dim, _ = shape_of(shapes, "control_layers.0.feed_forward.w1.weight", 2, _NEEDS)
    _, adaln_dim = shape_of(shapes, "control_layers.0.adaLN_modulation.0.weight", 2, _NEEDS)
    if adaln_dim != min(dim, ADALN_MAX):
        raise CheckpointError(f"'control_layers.0.adaLN_modulation.0.weight' takes {adaln_dim} features; expected "
                              f"min(width {dim}, {ADALN_MAX}) = {min(dim, ADALN_MAX)} (the base's timestep embedding).")
    layers, refiners = count_blocks(shapes, "control_layers"), count_blocks(shapes, "control_noise_refiner")
    if refiners == 0:
        raise CheckpointError(f"no 'control_noise_refiner' blocks (e.g. 'control_noise_refiner.0.attention.to_q.weight'), which {_NEEDS} needs; "
                              "the file is damaged or of another layout.")
    refiner_control = "control_noise_refiner.0.after_proj.weight" in shapes
    if refiner_control != (hint_channels == INPAINT_CHANNELS):
        found = "control blocks (version 2.x)" if refiner_control else "plain blocks (version 1)"
        raise CheckpointError(f"'{EMBEDDER}' takes a {hint_channels}-channel hint, but 'control_noise_refiner' holds {found}; "
                              f"version 1 takes {LATENT_CHANNELS} channels and 2.x {INPAINT_CHANNELS}. The file is damaged or mixed.")
    try:
        cfg = ZImageFunConfig(dim=dim, head_dim=head_dim, ffn_dim=ffn_dim, adaln_dim=adaln_dim, hint_channels=hint_channels,
                              num_control_layers=layers, num_refiner_layers=refiners, refiner_control=refiner_control)
    except ControlNetError as e:
        raise CheckpointError(f"the tensor shapes describe no valid Z-Image Fun ControlNet ({e})") from None
    for j in range(layers):
        _check_block(shapes, f"control_layers.{j}", cfg, first=j == 0, control=True)
    for i in range(refiners):
        _check_block(shapes, f"control_noise_refiner.{i}", cfg, first=i == 0, control=refiner_control)
    return cfg


def _all_zero(t: torch.Tensor) -> bool:
    return int(torch.count_nonzero(t.to(torch.float32))) == 0


def load(source: TensorSource, options: LoadOptions) -> LoadedControl:
    keys = list(source.keys())
    config = config_from_shapes({k: source.shape(k) for k in keys})
    if config.refiner_control and _all_zero(source.get(ZERO_REFINER)):
        config = dataclasses.replace(config, refiner_source=REFINER_FROM_CONTROL_LAYERS)
        log.warning("%s: '%s' is all zeros (the published Z-Image Fun ControlNet 2.0 file's untrained refiner); its refiner "
                    "outputs come from the control layers instead, as ComfyUI does", source.name, ZERO_REFINER)
    dtype = compute_dtype(source.stored_dtype(EMBEDDER), options.dtype)
    with torch.device("meta"):
        model = ZImageFunControlNet(config, dtype=dtype)
    read = float_reader(model, source, dtype, options.keep_fp8)
    strict_fill(model, lambda k: read(k, k), set(keys), source.name, FORMAT.name)
    finish_load(model, options, dtype)
    log.info("loaded %s as '%s': %s", source.name, FORMAT.name, config.summary())
    return LoadedControl(model, FORMAT.name, source.name)


def save(model: ZImageFunControlNet, path: Path, dtype: Optional[torch.dtype], overwrite: bool) -> Path:
    """The model's state dict is the file's layout (the 2.0 file's zero refiner weights included)."""
    return save_state_dict(model, path, dtype, overwrite)


FORMAT = Format("zimage-fun", "Z-Image Fun ControlNet union (alibaba-pai, versions 1 / 2.0 / 2.1; a model patch: MODEL in, MODEL out)",
                SIGNATURE, is_zimage_fun, load, save, kind="zimage_patch", takes_latent_hint=True,
                inference_dtypes=("bfloat16", "float32"))
