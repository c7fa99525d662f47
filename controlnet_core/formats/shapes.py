"""What every DiT format module needs to read an architecture off tensor shapes, and to write a file back: one copy.

Messages name no file (the loader puts the file's name in front) but say which family needed the key (`needs`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..checkpoint import check_output_file, save_safetensors
from ..errors import CheckpointError
from ..precision import FP8

Shapes = Mapping[str, Sequence[int]]
# fp8 is a storage format: fp8 files compute in bf16 unless the caller asks otherwise, as the host does


def shape_of(shapes: Shapes, key: str, rank: int, needs: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"no '{key}', which {needs} needs; the file is damaged or of another layout.")
    shape = tuple(int(d) for d in shapes[key])
    if len(shape) != rank or min(shape) < 1:
        raise CheckpointError(f"'{key}' has shape {list(shape)}; expected {rank} non-zero dimensions.")
    return shape


def expect(shapes: Shapes, key: str, expected: tuple[int, ...], why: str, needs: str) -> None:
    shape = shape_of(shapes, key, len(expected), needs)
    if shape != expected:
        raise CheckpointError(f"'{key}' has shape {list(shape)}; expected {list(expected)} ({why}).")


def count_blocks(shapes: Shapes, prefix: str) -> int:
    """Blocks numbered 0..n-1 under `prefix`, refusing gaps (a missing block) so no stray index sizes the model."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m[1]) for k in shapes if (m := pattern.match(k))}
    n = max(found) + 1 if found else 0
    if len(found) != n:
        gaps = [str(i) for i in range(n) if i not in found][:5]
        raise CheckpointError(f"'{prefix}' are numbered up to {n - 1}, but {', '.join(gaps)} are missing; the file is damaged.")
    return n


def compute_dtype(stored: torch.dtype, requested: Optional[torch.dtype]) -> torch.dtype:
    """The caller's dtype, else the stored one, with fp8 storage computing in bf16."""
    if requested is not None:
        return requested
    if not stored.is_floating_point:
        return torch.float32  # strict filling names the key and refuses it
    return torch.bfloat16 if stored in FP8 else stored


def save_state_dict(model: torch.nn.Module, path: Path, dtype: Optional[torch.dtype], overwrite: bool,
                    skip: tuple[str, ...] = (), extra: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Layouts whose keys are the model's parameter names: its state dict (minus `skip` prefixes, plus `extra`) as one
    .safetensors file, refused over an existing file unless `overwrite`, written atomically."""
    path = Path(path)
    check_output_file(path, overwrite)
    sd = {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}
    sd.update(extra or {})
    save_safetensors(sd, path, {"format": "pt"}, overwrite=overwrite)
    return path
