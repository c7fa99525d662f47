"""fp8-stored weights kept in fp8, each cast to the compute dtype where it is used.

Why: Flux and Qwen-Image ControlNets are mostly published in `float8_e4m3fn`. Upcasting them on load doubles (bf16)
or quadruples (fp32) their memory. ComfyUI keeps a ControlNet file's fp8 weights in fp8 and casts each layer's weight
as the layer runs (its "manual cast" operations), so a user who can load the file with the built-in loader must be
able to load it with ours. The cast is exact (every fp8 value is representable in bf16, fp16 and fp32), so the
outputs equal those of a model upcast on load; only the memory, and a cast per layer per forward, differ.

Only `nn.Linear` and `nn.Conv2d` weights and biases stay fp8: they hold nearly all the bytes. Other fp8 tensors
(norm scales, embeddings) are cast on reading. A kept layer changes class in place (a subclass whose forward casts),
so parameter names, and with them the state dict and the file layout on export, stay as they were.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FP8 = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))


# Bytes that are NaN or inf in each fp8 format, with the sign bit masked off (fnuz formats: only 0x80, sign kept).
_NON_FINITE_FP8 = {"float8_e4m3fn": lambda b: (b & 0x7F) == 0x7F, "float8_e5m2": lambda b: (b & 0x7F) >= 0x7C,
                   "float8_e4m3fnuz": lambda b: b == 0x80, "float8_e5m2fnuz": lambda b: b == 0x80}


def _any_non_finite_fp8(bits: torch.Tensor, fmt: str) -> bool:
    """Two reductions over the bytes, no temporaries: a positive NaN / inf is the top of the signed byte range, a
    negative one the top of the unsigned range (fnuz: the one NaN byte 0x80 is the signed minimum)."""
    if fmt.endswith("fnuz"):
        return int(bits.view(torch.int8).min()) == -128
    positive, negative = {"float8_e4m3fn": (0x7F, 0xFF), "float8_e5m2": (0x7C, 0xFC)}[fmt]
    return int(bits.view(torch.int8).max()) >= positive or int(bits.max()) >= negative


def count_non_finite_fp8(t: torch.Tensor) -> int:
    """NaN / inf values of an fp8 tensor, read from its bit patterns: torch has no sum or isfinite for fp8 on the
    CPU, and upcasting a whole tensor to check it would cost the memory that keeping fp8 saves. A finite tensor (the
    usual case) costs two max reductions; only a damaged one is counted exactly."""
    fmt = str(t.dtype).removeprefix("torch.")
    bits = t.reshape(-1).view(torch.uint8)
    if bits.numel() == 0 or not _any_non_finite_fp8(bits, fmt):
        return 0
    return int(_NON_FINITE_FP8[fmt](bits).sum())


class CastOnUseLinear(nn.Linear):
    """A Linear whose stored weight (fp8) is cast to the input's dtype on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastOnUseConv2d(nn.Conv2d):
    """A Conv2d whose stored weight (fp8) is cast to the input's dtype on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


_CAST_CLASS = {nn.Linear: CastOnUseLinear, nn.Conv2d: CastOnUseConv2d}


def castable_keys(model: nn.Module) -> frozenset[str]:
    """State-dict names of the tensors that may stay fp8: weights and biases of plain Linear and Conv2d layers."""
    out = set()
    for name, module in model.named_modules():
        if type(module) in _CAST_CLASS:
            prefix = f"{name}." if name else ""
            out.update(prefix + p for p, _ in module.named_parameters(recurse=False))
    return frozenset(out)


def cast_on_use(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Switch every plain Linear / Conv2d that holds fp8 tensors to its casting class; returns how many. Records
    `compute_dtype` on the model for the code that feeds it inputs (`compute_dtype_of`)."""
    n = 0
    for module in model.modules():
        cls = _CAST_CLASS.get(type(module))
        if cls is not None and any(p.dtype in FP8 for p in module.parameters(recurse=False)):
            module.__class__ = cls
            n += 1
    model.compute_dtype = compute_dtype
    return n


def compute_dtype_of(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype a model's inputs must have: the one recorded by `cast_on_use`, else its first parameter's."""
    recorded = getattr(model, "compute_dtype", None)
    if recorded is not None:
        return recorded
    return next((p.dtype for p in model.parameters() if p.dtype not in FP8), None)
