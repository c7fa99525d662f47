"""Strict loading of a module from (part of) a weight file, one tensor at a time (`loading.strict_fill`, with the
base model's key mapping, messages and 1x1-convolution views).

Why: a base checkpoint holds four models (UNet, VAE, one or two text encoders); each is built on the
`meta` device, then every weight is read once, straight into its dtype, and adopted (`assign=True`),
so peak memory stays near the size of the weights, and a key that does not fit is reported with the
file, the part of it, and what was found instead of what was expected.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from ..checkpoint import TensorSource
from ..errors import CheckpointError
from ..loading import strict_fill

log = logging.getLogger(__name__)


def prefixed(source: TensorSource, prefix: str) -> dict[str, str]:
    """{key without prefix: stored key} for every key under `prefix`."""
    return {k[len(prefix):]: k for k in source.keys() if k.startswith(prefix)}


def _fit(t: torch.Tensor, shape: torch.Size, key: str, where: str) -> torch.Tensor:
    if t.shape == shape:
        return t
    # 1x1 convolutions stored as linear weights (C_out, C_in) or the reverse: same numbers, other view
    if t.numel() == shape.numel() and [d for d in t.shape if d != 1] == [d for d in shape if d != 1]:
        return t.reshape(shape)
    raise CheckpointError(f"{where}: '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}; the weights belong to another architecture.")


def load_module(model: nn.Module, source: TensorSource, mapping: Mapping[str, str], *, what: str,
                dtype: Optional[torch.dtype] = None, device=None, ignore: Iterable[str] = ()) -> nn.Module:
    """Fill `model` (built on meta) from `source` with `loading.strict_fill`: `mapping` is {model key: stored key}; keys
    in `ignore` (e.g. `logit_scale`, `position_ids`) may be present without being used. Floating-point weights are read
    in `dtype` (default: the model's), other tensors in the model's dtype."""
    where = f"{source.name} ({what})"
    refs = model.state_dict()

    def mismatch(missing: list, unexpected: list, _wrong: list) -> str:
        return (
            f"{where}: the weights do not fit the architecture derived from their shapes: "
            f"{len(missing)} missing (e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {[mapping[k] for k in unexpected[:4]]}). "
            "The file is damaged or of a variant this loader does not know."
        )

    def read(k: str) -> torch.Tensor:
        t, ref = source.get(mapping[k]), refs[k]
        return t.to(dtype=dtype if (dtype is not None and t.is_floating_point()) else ref.dtype, device=device)

    strict_fill(model, read, mapping.keys(), where, mismatch=mismatch, ignore=ignore, fit=lambda k, t, shape: _fit(t, shape, mapping[k], where),
                check_finite=False)
    log.debug("%s: %d tensors loaded", where, len(refs))
    return model.eval().requires_grad_(False)


__all__ = ["load_module", "prefixed"]
