"""`load_control`: any supported file (or in-memory state dict) -> a ready ControlNet or T2I-Adapter.

The model is built on the `meta` device and each weight is read once, straight into its final
dtype, then adopted by the module (`assign=True`): peak memory stays near the size of the weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from . import formats
from .checkpoint import DictSource, TensorSource, open_checkpoint
from .config import ControlNetConfig, config_from_unet_like_state_dict
from .errors import BaseModelRequiredError, CheckpointError, ControlNetError, NonFiniteWeightsError, NotACheckpointError, UnknownLayoutError
from .formats import diffusers as diffusers_fmt
from .formats import ldm as ldm_fmt
from .formats import patches
from .formats import sd3_keys, sd35_keys
from .formats import t2i as t2i_fmt
from .mmdit import SD3ControlNet, SD3ControlNetConfig
from .mmdit.sd35_stability import SD35ControlNet, SD35ControlNetConfig
from .model import ControlNet
from .residuals import ControlResiduals
from .t2i_adapter import T2IAdapter, T2IAdapterConfig, config_from_t2i_shapes

log = logging.getLogger(__name__)

METADATA_CONFIG = "controlnet_core.config"  # our exports store the full ControlNetConfig as JSON
METADATA_GAP = "controlnet_core.global_average_pooling"

StateDictLike = Union[str, os.PathLike, Mapping[str, torch.Tensor], TensorSource]


@dataclass
class LoadedControl:
    """A loaded control model plus where it came from."""

    model: Union[ControlNet, T2IAdapter, SD3ControlNet, SD35ControlNet]
    format: str  # a key of formats.FORMATS
    source: str  # file path or description

    @property
    def kind(self) -> str:
        if isinstance(self.model, SD3ControlNet):
            return "sd3_controlnet"
        if isinstance(self.model, SD35ControlNet):
            return "sd35_controlnet"
        return "t2i_adapter" if isinstance(self.model, T2IAdapter) else "controlnet"

    @property
    def takes_latent_hint(self) -> bool:
        """True when the hint is the condition image encoded by the base model's VAE (the DiT families), not pixels."""
        return isinstance(self.model, (SD3ControlNet, SD35ControlNet))

    @property
    def config(self) -> Union[ControlNetConfig, T2IAdapterConfig, SD3ControlNetConfig, SD35ControlNetConfig]:
        return self.model.config

    def residuals(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor], y: Optional[torch.Tensor] = None,
                  **union) -> ControlResiduals:
        """`union`: `control_types` and `condition_weights` of a union ControlNet (see `ControlNet.forward`)."""
        return self.model(x, hint, timesteps, context, y, **union)


def as_source(obj: StateDictLike, what: str = "checkpoint") -> TensorSource:
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, Mapping):
        return DictSource(obj, name=f"<in-memory {what}>")
    return open_checkpoint(obj)


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


def _meta_shapes(source: TensorSource, mapping: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {c: torch.empty(source.shape(s), device="meta") for c, s in mapping.items()}


def _first_float_dtype(source: TensorSource, key: str) -> torch.dtype:
    dtype = source.stored_dtype(key)
    if not dtype.is_floating_point:
        raise CheckpointError(f"{source.name}: '{key}' is stored as {dtype}; model weights are floating point. The file is damaged or holds no model.")
    return dtype


def _read(source: TensorSource, key: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One stored tensor in `dtype`, refused unless it is floating point (integers would load as garbage weights)."""
    t = source.get(key)
    if not t.is_floating_point():
        raise CheckpointError(f"{source.name}: '{key}' is stored as {t.dtype}; model weights are floating point. The file is damaged or holds no model.")
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _non_finite(t: torch.Tensor) -> int:
    """How many values of `t` are NaN or infinite.

    Why a sum first: a NaN or inf anywhere makes it non-finite, and it reads the tensor once without allocating its
    size. On a full SD1.5 ControlNet (2 CPU threads) the sums take 0.10 s in fp32 and 0.06 s in fp16, under a tenth of
    the load; `isfinite(t).all()` took 1.5 s. Only a non-finite sum, which an overflow can also give, pays for the
    exact count."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return 0
    return int(t.numel() - torch.isfinite(t).sum())


def _refuse_non_finite(source_name: str, counts: Mapping[str, int], total: int) -> None:
    if counts:
        worst = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
        raise NonFiniteWeightsError(
            f"{source_name}: {sum(counts.values()):,} NaN/inf values in {len(counts)} of {total} weight tensors "
            f"({', '.join(f'{k}: {n:,}' for k, n in worst)}{', ...' if len(counts) > 5 else ''}); such a model gives black "
            "images. The file is damaged (or was saved from a diverged training run): download it again."
        )


def _strict_fill(model: torch.nn.Module, getter, available: set[str], source_name: str, fmt: str) -> None:
    """Fill `model` (on meta) from `getter(key) -> Tensor|None`; list missing/unexpected keys like a strict load."""
    expected = model.state_dict()
    missing = sorted(set(expected) - available)
    unexpected = sorted(available - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source_name}: detected as '{fmt}' ({formats.FORMATS.get(fmt, fmt)}), but the keys do not fit the architecture derived from its shapes. "
            f"Missing {len(missing)}: {missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected {len(unexpected)}: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
            "The file may be damaged, or a variant this version does not support."
        )
    loaded = {}
    non_finite: dict[str, int] = {}
    for key, ref in expected.items():
        t = getter(key)
        if t is None:
            raise CheckpointError(f"{source_name}: no weight for '{key}'.")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source_name}: '{key}' has shape {tuple(t.shape)}; the architecture derived from the other weights needs {tuple(ref.shape)}.")
        if not t.is_floating_point():
            raise CheckpointError(f"{source_name}: '{key}' is {t.dtype}; model weights are floating point. The file is damaged or holds no model.")
        if n := _non_finite(t):
            non_finite[key] = n
        loaded[key] = t
    _refuse_non_finite(source_name, non_finite, len(expected))
    model.load_state_dict(loaded, strict=True, assign=True)


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
) -> LoadedControl:
    """Load any supported ControlNet / T2I-Adapter checkpoint; the layout is detected from its keys.

    base_unet: the base model's UNet weights (bare ldm keys, or a full checkpoint with
        `model.diffusion_model.*`), needed by "diff" ControlNets and control-LoRAs.
    dtype: compute dtype of the returned model (default: the stored dtype).
    global_average_pooling: shuffle models; None detects it (metadata, diffusers config, file name).
    diffusers_config: a diffusers config.json (dict or path); by default one next to the file is used.

    Every bad input raises a `ControlNetError` subclass whose message names the file (see `errors.py`).
    """
    source = _control_source(checkpoint)
    with _naming(source.name):
        return _load(source, base_unet, dtype, device, global_average_pooling, diffusers_config, num_heads, num_head_channels)


def _load(source: TensorSource, base_unet, dtype, device, global_average_pooling, diffusers_config, num_heads, num_head_channels) -> LoadedControl:
    keys = set(source.keys())
    fmt = formats.detect_format(keys)
    if fmt is None:
        best, score = formats.closest_format(keys)
        sample = sorted(keys)[:5]
        raise UnknownLayoutError(
            f"{source.name}: not a ControlNet or T2I-Adapter layout this library knows ({len(keys)} tensors, e.g. {sample}). "
            f"Closest known layout: '{best}' ({formats.FORMATS[best]}; {score:.0%} of its signature modules present). "
            f"Supported: {', '.join(formats.FORMATS)}."
        )
    if fmt.startswith("t2i"):
        return _load_t2i(source, fmt, dtype, device)
    if fmt == "sd3-diffusers":
        return _load_sd3(source, fmt, dtype, device)
    if fmt == "sd35-stability":
        return _load_sd35(source, fmt, dtype, device)

    base: Optional[TensorSource] = None
    if fmt in ("diff", "control-lora"):
        if base_unet is None:
            raise BaseModelRequiredError(
                f"{source.name}: a '{fmt}' file ({formats.FORMATS[fmt]}) stores weights relative to a base model; "
                "pass the base model's UNet (in ComfyUI: connect the MODEL input of the loader)."
            )
        base = as_source(base_unet, "base UNet")
    diffusers_cfg = None
    if fmt == "diffusers":
        if diffusers_config is None:
            diffusers_cfg = _sibling_diffusers_config(source)
        elif isinstance(diffusers_config, Mapping):
            diffusers_cfg = dict(diffusers_config)
        else:
            diffusers_cfg = diffusers_fmt.read_config_json(diffusers_config)

    # 1. canonical key -> source key
    if fmt == "diffusers":
        mapping = diffusers_fmt.canonical_map(keys)
    elif fmt == "control-lora":
        mapping = ldm_fmt.canonical_map(keys, "")
    else:
        mapping = ldm_fmt.canonical_map(keys, ldm_fmt.prefix_of(keys))

    # 2. architecture from shapes (+ the base UNet's for control-LoRAs)
    gap = _resolve_gap(global_average_pooling, source, diffusers_cfg)
    shapes = _meta_shapes(source, mapping)
    if fmt == "control-lora":
        bp = patches.unet_prefix(base)
        shapes = {k[len(bp):]: torch.empty(base.shape(k), device="meta") for k in base.keys() if k.startswith(bp) and k[len(bp):].startswith(ldm_fmt.MODULES)}
        hint = source.shape("input_hint_block.0.weight")[1]
        derive_from, kw = shapes, dict(hint_channels=hint)
    else:
        derive_from, kw = shapes, {}
    config = _architecture(source, derive_from, kw, diffusers_cfg, gap, num_heads, num_head_channels)
    if global_average_pooling is not None and config.global_average_pooling != global_average_pooling:
        config = dataclasses.replace(config, global_average_pooling=global_average_pooling)

    # 3. weights
    if dtype is None:
        first = mapping.get("input_blocks.0.0.weight")
        dtype = _first_float_dtype(source, first) if first else (_first_float_dtype(base, bp + "input_blocks.0.0.weight") if base else torch.float32)
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
        _strict_fill(model, get_lora, available, source.name, fmt)
    elif fmt == "diff":
        bp = patches.unet_prefix(base)
        _strict_fill(model, lambda k: patches.diff_tensor(_read(source, mapping[k], None), k, base, bp, dtype), set(mapping), source.name, fmt)
    else:
        _strict_fill(model, lambda k: _read(source, mapping[k], dtype), set(mapping), source.name, fmt)
    model.to(device).eval().requires_grad_(False)
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


def _load_t2i(source: TensorSource, fmt: str, dtype: Optional[torch.dtype], device) -> LoadedControl:
    mapping = t2i_fmt.canonical_map(source.keys(), fmt)
    shapes = {c: source.shape(s) for c, s in mapping.items()}
    try:
        config = config_from_t2i_shapes(shapes)
    except (KeyError, IndexError, ValueError) as e:  # ValueError includes ControlNetError
        raise CheckpointError(f"{source.name}: detected as '{fmt}', but its shapes do not describe a T2I-Adapter ({e}).") from None
    if dtype is None:
        dtype = _first_float_dtype(source, next(iter(mapping.values())))
    with torch.device("meta"):
        model = T2IAdapter(config, dtype=dtype)
    _strict_fill(model, lambda k: _read(source, mapping[k], dtype), set(mapping), source.name, fmt)
    model.to(device).eval().requires_grad_(False)
    return LoadedControl(model, fmt, source.name)


def _load_sd3(source: TensorSource, fmt: str, dtype: Optional[torch.dtype], device) -> LoadedControl:
    """SD3 / SD3.5 ControlNets of the diffusers layout: their keys are our parameter names, so no key table."""
    keys = list(source.keys())
    config = sd3_keys.config_from_shapes({k: source.shape(k) for k in keys})
    if dtype is None:
        dtype = _first_float_dtype(source, "pos_embed.proj.weight")
    with torch.device("meta"):
        model = SD3ControlNet(config, dtype=dtype)
    _strict_fill(model, lambda k: _read(source, k, dtype), set(keys), source.name, fmt)
    model.to(device).eval().requires_grad_(False)
    log.info("loaded %s as '%s': %s", source.name, fmt, config.summary())
    return LoadedControl(model, fmt, source.name)


def _load_sd35(source: TensorSource, fmt: str, dtype: Optional[torch.dtype], device) -> LoadedControl:
    """Stability's SD3.5 ControlNets. The base model's embedder (`SD35ControlNetConfig.base_embedders`) is not read
    from the file: it starts as zeros and is adopted from the base model before sampling, as the reference does; a
    copy the file may carry anyway is ignored, as ComfyUI ignores it."""
    mapping = sd35_keys.canonical_map(source.keys())
    control_type = None
    if sd35_keys.CONTROL_TYPE_KEY in source.keys():
        value = source.get(sd35_keys.CONTROL_TYPE_KEY)
        if value.numel() != 1 or not bool(torch.isfinite(value.float()).all()):
            raise CheckpointError(f"{source.name}: '{sd35_keys.CONTROL_TYPE_KEY}' holds {value.numel()} values; expected one number (0 blur, 1 canny, 2 depth).")
        control_type = round(float(value.float().item()))
    config = sd35_keys.config_from_shapes({k: source.shape(s) for k, s in mapping.items()}, control_type)
    if dtype is None:
        dtype = _first_float_dtype(source, mapping["pos_embed_input.proj.weight"])
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

    def get(key: str) -> torch.Tensor:
        if key in from_base:
            return torch.zeros(shapes[key].shape, dtype=dtype)
        return _read(source, mapping[key], dtype)

    _strict_fill(model, get, set(mapping) | from_base, source.name, fmt)
    model.to(device).eval().requires_grad_(False)
    log.info("loaded %s as '%s': %s", source.name, fmt, config.summary())
    return LoadedControl(model, fmt, source.name)
