"""Stability's SD3.5 ControlNet layout (`sd3.5_large_controlnet_{blur,canny,depth}.safetensors`): detection, the key
table onto `controlnet_core.mmdit.SD35ControlNet`, and the architecture from tensor shapes.

The release files name their embedders either like the reference code (`t_embedder.mlp.0`, `y_embedder.mlp.0`) or
like diffusers (`time_text_embed.timestep_embedder.linear_1`, `time_text_embed.text_embedder.linear_1`); ComfyUI
accepts both, and so do we. The latent's patch embedding is normally absent: it is the base model's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..checkpoint import TensorSource
from ..errors import CheckpointError, ControlNetError
from ..loading import LoadedControl, LoadOptions, finish_load, first_float_dtype, float_reader, strict_fill
from ..mmdit.config import HEAD_DIM, TIME_FREQ_DIM
from ..mmdit.sd35_stability import CONTROL_TYPES, SD35ControlNet, SD35ControlNetConfig
from .record import Format
from .shapes import compute_dtype, count_blocks, expect, save_state_dict, shape_of

log = logging.getLogger(__name__)

SIGNATURE = ("pos_embed_input.proj.weight", "transformer_blocks.0.adaLN_modulation.1.bias", "controlnet_blocks.0.weight")
CONTROL_TYPE_KEY = "control_type"  # a one-element tensor: 0 blur, 1 canny, 2 depth

# diffusers-style name -> ours, for the embedders (the blocks have one naming only)
_ALIASES = {
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "pos_embed.proj.": "x_embedder.proj.",
}


def is_sd35_stability(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return all(k in keys for k in SIGNATURE)


def our_name(key: str) -> str:
    for theirs, ours in _ALIASES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def canonical_map(keys: Iterable[str]) -> dict[str, str]:
    """Our parameter name -> the file's key, for every tensor but the control type."""
    out: dict[str, str] = {}
    for k in keys:
        if k == CONTROL_TYPE_KEY:
            continue
        name = our_name(k)
        if name in out:
            raise CheckpointError(f"'{k}' and '{out[name]}' are the same weight under two names; the file is damaged.")
        out[name] = k
    return out



def _shape(shapes, key: str, rank: int) -> tuple[int, ...]:
    return shape_of(shapes, key, rank, 'a Stability SD3.5 ControlNet')


def _expect(shapes, key: str, expected: tuple[int, ...], why: str) -> None:
    expect(shapes, key, expected, why, 'a Stability SD3.5 ControlNet')


_count = count_blocks

def config_from_shapes(shapes: Mapping[str, Sequence[int]], control_type: Optional[int] = None) -> SD35ControlNetConfig:
    """The architecture `shapes` (our names -> shape; see `canonical_map`) describe. Raises `CheckpointError` naming the
    first key that does not fit."""
    hidden, in_ch, p, p2 = _shape(shapes, "pos_embed_input.proj.weight", 4)
    if p != p2:
        raise CheckpointError(f"'pos_embed_input.proj.weight' has a {p}x{p2} patch; SD3 patches are square.")
    if hidden % HEAD_DIM:
        raise CheckpointError(f"'pos_embed_input.proj.weight' makes the model {hidden} wide, not a multiple of the head width {HEAD_DIM}.")
    y_out, y_in = _shape(shapes, "y_embedder.mlp.0.weight", 2)
    if y_out != hidden:
        raise CheckpointError(f"'y_embedder.mlp.0.weight' has shape {[y_out, y_in]}; its output must be the model's width {hidden}.")
    double_y = y_in == hidden
    _expect(shapes, "y_embedder.mlp.2.weight", (hidden, hidden), "the model's width")
    _expect(shapes, "t_embedder.mlp.0.weight", (hidden, TIME_FREQ_DIM), "a 256-wide timestep embedding")
    _expect(shapes, "t_embedder.mlp.2.weight", (hidden, hidden), "the model's width")
    if double_y:
        _expect(shapes, "x_embedder.proj.weight", (hidden, in_ch, p, p), "this variant carries its own patch embedding")
    depth, outs = _count(shapes, "transformer_blocks"), _count(shapes, "controlnet_blocks")
    if depth == 0 or outs != depth:
        raise CheckpointError(f"{depth} transformer blocks but {outs} controlnet_blocks; each block has one output layer.")
    inner = _shape(shapes, "transformer_blocks.0.mlp.fc1.weight", 2)[0]
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        _expect(shapes, b + "adaLN_modulation.1.weight", (6 * hidden, hidden), "shift, scale and gate for attention and MLP")
        _expect(shapes, b + "attn.qkv.weight", (3 * hidden, hidden), "queries, keys and values")
        _expect(shapes, b + "attn.proj.weight", (hidden, hidden), "the model's width")
        _expect(shapes, b + "mlp.fc1.weight", (inner, hidden), "the MLP width of block 0")
        _expect(shapes, b + "mlp.fc2.weight", (hidden, inner), "the MLP width of block 0")
        _expect(shapes, f"controlnet_blocks.{i}.weight", (hidden, hidden), "the model's width")
    if control_type is not None and control_type not in CONTROL_TYPES:
        raise CheckpointError(f"'{CONTROL_TYPE_KEY}' is {control_type}; known types are {CONTROL_TYPES}.")
    try:
        return SD35ControlNetConfig(hidden_size=hidden, num_layers=depth, patch_size=p, in_channels=in_ch,
                                    adm_in_channels=2048 if double_y else y_in, mlp_hidden_dim=inner, double_y_emb=double_y,
                                    control_type=control_type)
    except ControlNetError as e:
        raise CheckpointError(f"the tensor shapes describe no valid SD3.5 ControlNet ({e})") from None


def load(source: TensorSource, options: LoadOptions) -> LoadedControl:
    """Stability's SD3.5 ControlNets. The base model's embedder (`SD35ControlNetConfig.base_embedders`) is not read
    from the file: it starts as zeros and is adopted from the base model before sampling, as the reference does; a
    copy the file may carry anyway is ignored, as ComfyUI ignores it."""
    mapping = canonical_map(source.keys())
    control_type = None
    if CONTROL_TYPE_KEY in source.keys():
        value = source.get(CONTROL_TYPE_KEY)
        if value.numel() != 1 or not bool(torch.isfinite(value.float()).all()):
            raise CheckpointError(f"{source.name}: '{CONTROL_TYPE_KEY}' holds {value.numel()} values; expected one number (0 blur, 1 canny, 2 depth).")
        control_type = round(float(value.float().item()))
    config = config_from_shapes({k: source.shape(s) for k, s in mapping.items()}, control_type)
    dtype = compute_dtype(first_float_dtype(source, mapping["pos_embed_input.proj.weight"]), options.dtype)
    with torch.device("meta"):
        model = SD35ControlNet(config, dtype=dtype)
    adopted = tuple(p + "." for p in config.base_embedders)
    from_base = {k for k in model.state_dict() if k.startswith(adopted)}
    ignored = sorted(k for k in mapping if k.startswith(adopted))
    if ignored:
        log.info("%s: ignoring %s; the base model's own replace them before sampling", source.name, ", ".join(ignored))
    for k in ignored:
        del mapping[k]
    shapes = model.state_dict()
    read = float_reader(model, source, dtype, options.keep_fp8)

    def get(key: str) -> torch.Tensor:
        if key in from_base:
            return torch.zeros(shapes[key].shape, dtype=dtype)
        return read(key, mapping[key])

    strict_fill(model, get, set(mapping) | from_base, source.name, FORMAT.name)
    finish_load(model, options, dtype)
    log.info("loaded %s as '%s': %s", source.name, FORMAT.name, config.summary())
    return LoadedControl(model, FORMAT.name, source.name)


def save(model: SD35ControlNet, path: Path, dtype: Optional[torch.dtype], overwrite: bool) -> Path:
    """The release layout: reference names, no base-model embedder, the control type as a one-element tensor."""
    adopted = tuple(p + "." for p in model.config.base_embedders)
    extra = {CONTROL_TYPE_KEY: torch.tensor([float(model.config.control_type)])} if model.config.control_type is not None else {}
    return save_state_dict(model, path, dtype, overwrite, skip=adopted, extra=extra)


FORMAT = Format("sd35-stability", "Stability SD3.5 Large ControlNet (blur / canny / depth; the patch embedding is the base model's)",
                SIGNATURE, is_sd35_stability, load, save, kind="sd35_controlnet", takes_latent_hint=True)
