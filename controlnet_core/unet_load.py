"""Loading the UNet-era layouts (ldm v1.0/v1.1, diffusers, diff, control-LoRA, SDXL union) and T2I-Adapters: key
tables onto our canonical ldm names, the architecture from shapes (plus our metadata or a diffusers config.json), and
the weights.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Optional

import torch

from .checkpoint import TensorSource
from .config import ControlNetConfig, config_from_unet_like_state_dict
from .errors import BaseModelRequiredError, CheckpointError, ControlNetError
from .formats import FORMATS, patches
from .formats import diffusers as diffusers_fmt
from .formats import ldm as ldm_fmt
from .formats import t2i as t2i_fmt
from .loading import LoadedControl, LoadOptions, as_source, first_float_dtype, meta_shapes, read_float, strict_fill
from .model import ControlNet
from .t2i_adapter import T2IAdapter, config_from_t2i_shapes

log = logging.getLogger(__name__)

METADATA_CONFIG = "controlnet_core.config"  # our exports store the full ControlNetConfig as JSON
METADATA_GAP = "controlnet_core.global_average_pooling"


def _sibling_diffusers_config(source: TensorSource) -> Optional[dict]:
    if source.path is None:
        return None
    cfg = source.path.parent / "config.json"
    if cfg.is_file():
        data = diffusers_fmt.read_config_json(cfg)
        if data.get("_class_name", "ControlNetModel") in ("ControlNetModel", "ControlNetUnionModel"):
            return data
    return None


def _flag(value, what: str) -> bool:
    """A stored on/off setting: a JSON bool or the text true/false. Anything else is an error, never a guess: the text
    "false" is truthy to Python and used to turn pooling on."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise CheckpointError(f"{what} is {value!r}; expected true or false.")


def _resolve_gap(explicit: Optional[bool], source: TensorSource, diffusers_cfg: Optional[dict]) -> bool:
    if explicit is not None:
        return explicit
    if METADATA_GAP in source.metadata:
        return _flag(source.metadata[METADATA_GAP], f"{source.name}: metadata '{METADATA_GAP}'")
    if diffusers_cfg is not None and "global_pool_conditions" in diffusers_cfg:
        return _flag(diffusers_cfg["global_pool_conditions"], f"{source.name}: diffusers config 'global_pool_conditions'")
    # The official shuffle file carries no metadata: its name is the only signal there is.
    if source.path is not None and "shuffle" in source.path.stem.lower():
        log.info("%s: 'shuffle' in the file name, so global average pooling is on (pass global_average_pooling=False to override)", source.path.name)
        return True
    return False


def load_unet(source: TensorSource, fmt: str, opts: LoadOptions) -> LoadedControl:
    """Every UNet-era ControlNet format (`fmt`: ldm-v1.0-full, ldm-v1.1, ldm, diff, control-lora, diffusers)."""
    keys = set(source.keys())
    base: Optional[TensorSource] = None
    if fmt in ("diff", "control-lora"):
        if opts.base_unet is None:
            raise BaseModelRequiredError(
                f"{source.name}: a '{fmt}' file ({FORMATS[fmt]}) stores weights relative to a base model; "
                "pass the base model's UNet (in ComfyUI: connect the MODEL input of the loader)."
            )
        base = as_source(opts.base_unet, "base UNet")
    diffusers_cfg = None
    if fmt == "diffusers":
        if opts.diffusers_config is None:
            diffusers_cfg = _sibling_diffusers_config(source)
        elif isinstance(opts.diffusers_config, Mapping):
            diffusers_cfg = dict(opts.diffusers_config)
        else:
            diffusers_cfg = diffusers_fmt.read_config_json(opts.diffusers_config)

    # 1. canonical key -> source key
    if fmt == "diffusers":
        mapping = diffusers_fmt.canonical_map(keys)
    elif fmt == "control-lora":
        mapping = ldm_fmt.canonical_map(keys, "")
    else:
        mapping = ldm_fmt.canonical_map(keys, ldm_fmt.prefix_of(keys))

    # 2. architecture from shapes (+ the base UNet's for control-LoRAs)
    gap = _resolve_gap(opts.global_average_pooling, source, diffusers_cfg)
    shapes = meta_shapes(source, mapping)
    if fmt == "control-lora":
        bp = patches.unet_prefix(base)
        shapes = {k[len(bp):]: torch.empty(base.shape(k), device="meta") for k in base.keys() if k.startswith(bp) and k[len(bp):].startswith(ldm_fmt.MODULES)}
        hint = source.shape("input_hint_block.0.weight")[1]
        derive_from, kw = shapes, dict(hint_channels=hint)
    else:
        derive_from, kw = shapes, {}
    config = _architecture(source, derive_from, kw, diffusers_cfg, gap, opts.num_heads, opts.num_head_channels)
    if opts.global_average_pooling is not None and config.global_average_pooling != opts.global_average_pooling:
        config = dataclasses.replace(config, global_average_pooling=opts.global_average_pooling)

    # 3. weights
    dtype = opts.dtype
    if dtype is None:
        first = mapping.get("input_blocks.0.0.weight")
        dtype = first_float_dtype(source, first) if first else (first_float_dtype(base, bp + "input_blocks.0.0.weight") if base else torch.float32)
    with torch.device("meta"):
        model = ControlNet(config, dtype=dtype)
    if fmt == "control-lora":
        expected = set(model.state_dict())
        cache: dict[str, torch.Tensor] = {}

        def get_lora(key: str):
            return cache.pop(key) if key in cache else patches.lora_tensor(source, key, base, bp, dtype)

        available = set()
        for k in expected:
            t = patches.lora_tensor(source, k, base, bp, dtype)
            if t is not None:
                cache[k] = t
                available.add(k)
        lora_only = {k for k in keys if not k.endswith((".up", ".down")) and k != patches.LORA_MARKER}
        available |= lora_only
        strict_fill(model, get_lora, available, source.name, fmt)
    elif fmt == "diff":
        bp = patches.unet_prefix(base)
        strict_fill(model, lambda k: patches.diff_tensor(read_float(source, mapping[k], None), k, base, bp, dtype), set(mapping), source.name, fmt)
    else:
        strict_fill(model, lambda k: read_float(source, mapping[k], dtype), set(mapping), source.name, fmt)
    model.to(opts.device).eval().requires_grad_(False)
    log.info("loaded %s as '%s': %s", source.name, fmt, config.family())
    return LoadedControl(model, fmt, source.name)


def _architecture(source: TensorSource, derive_from: Mapping[str, torch.Tensor], kw: dict, diffusers_cfg: Optional[dict], gap: bool,
                  num_heads: Optional[int], num_head_channels: Optional[int]) -> ControlNetConfig:
    """The architecture: our own metadata when present, else the shapes (head counts from a diffusers config).

    A config that says more than the shapes show (a block removed from the file) is trusted, and the file refused
    with both, rather than loaded silently as a smaller model."""
    if METADATA_CONFIG in source.metadata:
        try:
            declared = ControlNetConfig.from_json(source.metadata[METADATA_CONFIG])
        except ControlNetError as e:
            raise CheckpointError(f"{source.name}: metadata '{METADATA_CONFIG}' is unusable: {e}") from None
        try:
            derived = config_from_unet_like_state_dict(derive_from, source=source.name, **kw)
        except CheckpointError as e:
            raise CheckpointError(f"{source.name}: its metadata describes {declared.summary()}, but the tensors do not form it: {e}") from None
        differences = declared.shape_differences(derived)
        if differences:
            raise CheckpointError(
                f"{source.name}: its metadata '{METADATA_CONFIG}' and its tensors disagree: {'; '.join(differences)}. "
                "Part of the model is missing from the file (or the metadata is wrong); download it again."
            )
        return declared
    heads, head_ch = num_heads, num_head_channels
    if heads is None and head_ch is None and diffusers_cfg is not None:
        probe = config_from_unet_like_state_dict(derive_from, source=source.name, **kw)
        heads, head_ch = diffusers_fmt.heads_from_config(diffusers_cfg, probe.level_channels)
    config = config_from_unet_like_state_dict(derive_from, num_heads=heads, num_head_channels=head_ch, global_average_pooling=gap, source=source.name, **kw)
    if diffusers_cfg is not None:
        differences = diffusers_fmt.config_mismatches(diffusers_cfg, config)
        if differences:
            raise CheckpointError(
                f"{source.name}: its diffusers config.json and its tensors disagree: {'; '.join(differences)}. "
                "Part of the model is missing from the file (or the config belongs to another model); download it again."
            )
    return config


def load_t2i(source: TensorSource, fmt: str, opts: LoadOptions) -> LoadedControl:
    """T2I-Adapters, original and diffusers layouts."""
    dtype = opts.dtype
    mapping = t2i_fmt.canonical_map(source.keys(), fmt)
    shapes = {c: source.shape(s) for c, s in mapping.items()}
    try:
        config = config_from_t2i_shapes(shapes)
    except (KeyError, IndexError, ValueError) as e:  # ValueError includes ControlNetError
        raise CheckpointError(f"{source.name}: detected as '{fmt}', but its shapes do not describe a T2I-Adapter ({e}).") from None
    if dtype is None:
        dtype = first_float_dtype(source, next(iter(mapping.values())))
    with torch.device("meta"):
        model = T2IAdapter(config, dtype=dtype)
    strict_fill(model, lambda k: read_float(source, mapping[k], dtype), set(mapping), source.name, fmt)
    model.to(opts.device).eval().requires_grad_(False)
    return LoadedControl(model, fmt, source.name)
