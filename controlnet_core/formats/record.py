"""`Format`: everything the library knows about one checkpoint layout, in one record.

Why a record: a layout used to touch five places (detection, the format table, the loader's dispatch, the exporter,
the CLI). Now each `formats/` module declares its records and `formats.REGISTRY` lists them in detection order; the
loader and `save_native` only iterate over it. Adding a family means one module here plus its model module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:
    import torch

    from ..checkpoint import TensorSource
    from ..loading import LoadedControl, LoadOptions


@dataclass(frozen=True)
class Format:
    """One checkpoint layout.

    name: the key users see (`LoadedControl.format`, `info`, error messages).
    signature: keys that together identify the layout; also how an unknown file's closest layout is named.
    detect: keys -> whether a file is of this layout; the registry asks in order, so a more specific layout comes first.
    load: (source, options) -> `LoadedControl`, raising `CheckpointError` (or a sibling) for a broken file.
    save: (model, path, dtype, overwrite) -> path, writing the model back in this very layout; None when the layout
        is only read (e.g. "diff" files, whose deltas need the base they were made against).
    kind: what the model is: "controlnet", "t2i_adapter", "sd3_controlnet", "sd35_controlnet", ...
    takes_latent_hint: the hint is the condition image through the base model's VAE (DiT families), not pixels.
    inference_dtypes: the compute dtypes the family runs in, preferred first (names of torch dtypes); a host picks
        the first its device supports. Flux and Qwen-Image overflow in fp16, so they list bf16 first, as ComfyUI does.
    """

    name: str
    description: str
    signature: tuple[str, ...]
    detect: Callable[[frozenset], bool]
    load: Callable[["TensorSource", "LoadOptions"], "LoadedControl"]
    save: Optional[Callable[["torch.nn.Module", Path, "Optional[torch.dtype]", bool], Path]] = None
    kind: str = "controlnet"
    takes_latent_hint: bool = False
    inference_dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")

    def signature_stems(self) -> set[str]:
        return {k.split(".")[0] for k in self.signature}


def lazy(module: str, function: str, *args) -> Callable:
    """`module.function(source, *args, options)` imported on first call: the loaders import the format tables, so the
    records cannot import the loaders when they are made."""
    def call(source, options):
        import importlib

        return getattr(importlib.import_module(module, __package__), function)(source, *args, options)

    return call


def names(formats: Iterable[Format]) -> list[str]:
    return [f.name for f in formats]


def lazy_save(module: str, function: str, **fixed) -> Callable:
    """`module.function(model, path, dtype=..., overwrite=..., **fixed)`, imported on first call (see `lazy`)."""
    def call(model, path, dtype, overwrite):
        import importlib

        return getattr(importlib.import_module(module, __package__), function)(model, path, dtype=dtype, overwrite=overwrite, **fixed)

    return call
