"""What every format's load shares: opening a source, the `LoadedControl` result, and filling a model built on the
`meta` device from a file, strictly (every key, every shape, floating point, finite). `strict_fill` is the library's one
strict fill: the base model's parts (`unet.unet_from_state_dict`, `base_models.weights.load_module`) and the annotators'
networks use it too.

The model is built on `meta` and each weight is read once, straight into its final dtype, then adopted by the module
(`assign=True`): peak memory stays near the size of the weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from .checkpoint import DictSource, TensorSource, open_checkpoint
from .errors import CheckpointError, ControlNetError, NonFiniteWeightsError
from .residuals import ControlResiduals

StateDictLike = Union[str, os.PathLike, Mapping[str, torch.Tensor], TensorSource]


@dataclass(frozen=True)
class LoadOptions:
    """The caller's choices for one load; each format reads the ones that concern it (see `load_control`)."""

    base_unet: Optional[StateDictLike] = None
    dtype: Optional[torch.dtype] = None
    device: Union[str, torch.device] = "cpu"
    global_average_pooling: Optional[bool] = None
    diffusers_config: Optional[Union[dict, str, os.PathLike]] = None
    num_heads: Optional[int] = None
    num_head_channels: Optional[int] = None
    keep_fp8: bool = False  # fp8-stored Linear / Conv2d weights stay fp8, cast where used (see precision.py)


@dataclass
class LoadedControl:
    """A loaded control model plus where it came from."""

    model: torch.nn.Module  # ControlNet, T2IAdapter, SD3ControlNet, SD35ControlNet, ...
    format: str  # a key of formats.FORMATS
    source: str  # file path or description

    @property
    def kind(self) -> str:
        """What the model is ("controlnet", "t2i_adapter", "sd3_controlnet", ...), from its format's record."""
        from .formats import get_format

        return get_format(self.format).kind

    @property
    def takes_latent_hint(self) -> bool:
        """True when the hint is the condition image encoded by the base model's VAE (the DiT families), not pixels."""
        from .formats import get_format

        # diffusers' conversion of XLabs Flux files keeps the pixel hint encoder in an otherwise latent-hint layout
        return get_format(self.format).takes_latent_hint and not getattr(self.config, "pixel_hint", False)

    @property
    def config(self):
        return self.model.config

    def residuals(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor], y: Optional[torch.Tensor] = None,
                  **union) -> ControlResiduals:
        """UNet families: `union` holds `control_types` and `condition_weights` of a union ControlNet (see `ControlNet.forward`)."""
        return self.model(x, hint, timesteps, context, y, **union)


def as_source(obj: StateDictLike, what: str = "checkpoint") -> TensorSource:
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, Mapping):
        return DictSource(obj, name=f"<in-memory {what}>")
    return open_checkpoint(obj)


def _describe(fmt: str) -> str:
    from .formats import FORMATS

    return FORMATS.get(fmt, fmt)


def meta_shapes(source: TensorSource, mapping: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Empty `meta` tensors of the stored shapes, under our names (`mapping`: ours -> the file's)."""
    return {c: torch.empty(source.shape(s), device="meta") for c, s in mapping.items()}


def first_float_dtype(source: TensorSource, key: str) -> torch.dtype:
    dtype = source.stored_dtype(key)
    if not dtype.is_floating_point:
        raise CheckpointError(f"{source.name}: '{key}' is stored as {dtype}; model weights are floating point. The file is damaged or holds no model.")
    return dtype


def read_float(source: TensorSource, key: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One stored tensor in `dtype`, refused unless it is floating point (integers would load as garbage weights)."""
    t = source.get(key)
    if not t.is_floating_point():
        raise CheckpointError(f"{source.name}: '{key}' is stored as {t.dtype}; model weights are floating point. The file is damaged or holds no model.")
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def float_reader(model: torch.nn.Module, source: TensorSource, dtype: Optional[torch.dtype], keep_fp8: bool):
    """`read(ours, theirs)`: the file's tensor `theirs` for our parameter `ours`, in `dtype`; with `keep_fp8`, an fp8
    tensor of a layer that can cast on use (precision.py) stays fp8. `model` is the one on `meta` being filled."""
    from .precision import FP8, castable_keys

    keep = castable_keys(model) if keep_fp8 else frozenset()

    def read(ours: str, theirs: str) -> torch.Tensor:
        if ours in keep and source.stored_dtype(theirs) in FP8:
            return read_float(source, theirs, None)
        return read_float(source, theirs, dtype)

    return read


def finish_load(model: torch.nn.Module, options: LoadOptions, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """After filling: layers still holding fp8 cast on use, then to the caller's device, in eval mode, frozen."""
    if options.keep_fp8 and dtype is not None:
        from .precision import cast_on_use

        cast_on_use(model, dtype)
    return model.to(options.device).eval().requires_grad_(False)


def count_non_finite(t: torch.Tensor) -> int:
    """How many values of `t` are NaN or infinite.

    Why a sum first: a NaN or inf anywhere makes it non-finite, and it reads the tensor once without allocating its
    size. On a full SD1.5 ControlNet (2 CPU threads) the sums take 0.10 s in fp32 and 0.06 s in fp16, under a tenth of
    the load; `isfinite(t).all()` took 1.5 s. Only a non-finite sum, which an overflow can also give, pays for the
    exact count."""
    from .precision import FP8, count_non_finite_fp8

    if t.dtype in FP8:
        return count_non_finite_fp8(t)
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return 0
    return int(t.numel() - torch.isfinite(t).sum())


def refuse_non_finite(source_name: str, counts: Mapping[str, int], total: int) -> None:
    if counts:
        worst = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
        raise NonFiniteWeightsError(
            f"{source_name}: {sum(counts.values()):,} NaN/inf values in {len(counts)} of {total} weight tensors "
            f"({', '.join(f'{k}: {n:,}' for k, n in worst)}{', ...' if len(counts) > 5 else ''}); such a model gives black "
            "images. The file is damaged (or was saved from a diverged training run): download it again."
        )


Mismatch = Callable[[list, list, list], str]  # (missing, unexpected, wrong shapes) -> the error message


def _format_mismatch(source_name: str, fmt: str) -> Mismatch:
    """`load_control`'s wording: the file was detected as `fmt`, and its keys do not fit that architecture."""

    def message(missing: list, unexpected: list, wrong: list) -> str:
        return (
            f"{source_name}: detected as '{fmt}' ({_describe(fmt)}), but the keys do not fit the architecture derived from its shapes. "
            f"Missing {len(missing)}: {missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected {len(unexpected)}: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
            "The file may be damaged, or a variant this version does not support."
        )

    return message


def strict_fill(model: torch.nn.Module, getter: Callable[[str], Optional[torch.Tensor]], available: Iterable[str], source_name: str,
                fmt: Optional[str] = None, *, mismatch: Optional[Mismatch] = None, error: type[ControlNetError] = CheckpointError,
                ignore: Iterable[str] = (), shapes: Optional[Mapping[str, Sequence[int]]] = None,
                fit: Optional[Callable[[str, torch.Tensor, torch.Size], torch.Tensor]] = None, check_finite: bool = True) -> torch.nn.Module:
    """Fill `model` from `getter(key) -> Tensor|None`, strictly: the one loader of every model of the library (control
    models, the base model's UNet, VAE and text encoders) and of the annotators' networks.

    available: the keys the file has, in the model's names; every key of `model.state_dict()` must be there, and nothing
        else but `ignore` (keys a file may hold without them being used, e.g. `position_ids`).
    source_name: the file, or the file and its part, that messages start with.
    fmt / mismatch: the message for keys that do not fit: `load_control`'s, naming the detected format `fmt`, or
        `mismatch(missing, unexpected, wrong_shapes)` of the caller's own.
    error: the class raised for keys, shapes and dtypes that do not fit (a `ControlNetError`).
    shapes: the stored shapes, where known before reading (weights already in memory): wrong ones are reported with the
        missing and unexpected keys. Otherwise each is checked as it is read: `fit(key, tensor, expected_shape)` may
        return another view of the same numbers, or raise; without it a different shape is refused.
    check_finite: refuse NaN / inf values (`NonFiniteWeightsError`).

    A model on `meta` adopts the tensors as they are (`assign=True`: read once, in the dtype `getter` gives); a model
    with real storage has them copied into its own dtype and device. Returns `model`.
    """
    # 1. keys (and shapes known before reading)
    expected = model.state_dict()
    available = set(available)
    missing = sorted(set(expected) - available)
    unexpected = sorted(available - set(expected) - set(ignore))
    wrong = [k for k in expected if shapes is not None and k in shapes and tuple(shapes[k]) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        if mismatch is None:
            if fmt is None:
                raise TypeError("strict_fill needs the detected format `fmt` or a `mismatch` message")
            mismatch = _format_mismatch(source_name, fmt)
        raise error(mismatch(missing, unexpected, wrong))
    # 2. each tensor: present, of its shape, floating point where the model's is, finite
    loaded = {}
    non_finite: dict[str, int] = {}
    for key, ref in expected.items():
        t = getter(key)
        if t is None:
            raise error(f"{source_name}: no weight for '{key}'.")
        if fit is not None:
            t = fit(key, t, ref.shape)
        elif tuple(t.shape) != tuple(ref.shape):
            raise error(f"{source_name}: '{key}' has shape {tuple(t.shape)}; the architecture derived from the other weights needs {tuple(ref.shape)}.")
        if ref.is_floating_point() and not t.is_floating_point():
            raise error(f"{source_name}: '{key}' is {t.dtype}; model weights are floating point. The file is damaged or holds no model.")
        if check_finite and (n := count_non_finite(t)):
            non_finite[key] = n
        loaded[key] = t
    refuse_non_finite(source_name, non_finite, len(expected))
    # 3. adopt (meta) or copy
    model.load_state_dict(loaded, strict=True, assign=any(t.is_meta for t in expected.values()))
    return model
