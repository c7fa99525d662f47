"""Finding files on disk: a component's weights in a diffusers folder, and the CLIP tokenizer files.

Why a search for the tokenizer: single-file checkpoints hold no tokenizer, yet every SD family uses the
same CLIP vocabulary, which any ComfyUI install ships (`comfy/sd1_tokenizer/`) and every diffusers model
folder has (`tokenizer/`). Nothing is downloaded: when no copy is found, the error says where to get one.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import TensorSource, open_checkpoint
from ..errors import CheckpointError
from .tokenizer import TokenizerError

log = logging.getLogger(__name__)

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


class ShardedSource(TensorSource):
    """A weight file split in shards (`*.safetensors.index.json` with a `weight_map`), read as one source."""

    def __init__(self, index: Path):
        self.path = index
        self.metadata = {}
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a readable shard index (expected JSON with a 'weight_map'; {e}).") from None
        shards = {name: open_checkpoint(index.parent / name) for name in sorted(set(weight_map.values()))}
        self._where = {key: shards[name] for key, name in weight_map.items()}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self._where[key].get(key, dtype)


def component_weights(folder: Path) -> TensorSource:
    """The weights of one diffusers component folder (unet/, vae/, text_encoder/, ...).

    Preference: plain safetensors, sharded safetensors, the fp16 variant, then pickles (`weights_only`)."""
    candidates = []
    for stem in _WEIGHT_STEMS:
        candidates += [folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json", folder / f"{stem}.fp16.safetensors",
                       folder / f"{stem}.fp16.safetensors.index.json"]
    for stem in _WEIGHT_STEMS:
        candidates += [folder / f"{stem}.bin", folder / f"{stem}.fp16.bin"]
    for c in candidates:
        if c.is_file():
            return ShardedSource(c) if c.name.endswith(".index.json") else open_checkpoint(c)
    raise CheckpointError(
        f"{folder}: no weights found (looked for {', '.join(s + '.safetensors' for s in _WEIGHT_STEMS)} and the .bin/.fp16 "
        "variants). The diffusers folder is incomplete; download the component again."
    )


def read_json(path: Path) -> dict:
    """A diffusers/transformers config file, or {} when absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e}). Replace the file.") from None


def _tokenizer_in(d: Path) -> Optional[Path]:
    """`d` itself, its diffusers `tokenizer/`, or a ComfyUI root's `comfy/sd1_tokenizer/`, if it holds the files."""
    for c in (d, d / "tokenizer", d / "comfy" / "sd1_tokenizer"):
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            return c
    return None


def find_tokenizer_dir(base: Path, explicit: Optional[Path] = None) -> Path:
    """Where the CLIP `vocab.json` + `merges.txt` are, for the base model at `base`.

    Order: `explicit` (a tokenizer folder, a diffusers model folder or a ComfyUI root); the base model's own
    diffusers `tokenizer/`; `$COMFYUI_PATH`; a ComfyUI install that contains the checkpoint or this package
    (`ComfyUI/models/checkpoints/...`, `ComfyUI/custom_nodes/...`).
    """
    if explicit is not None:
        found = _tokenizer_in(Path(explicit))
        if found is None:
            raise TokenizerError(
                f"--tokenizer {explicit}: no vocab.json + merges.txt there (nor in its tokenizer/ or comfy/sd1_tokenizer/). "
                "Point it at a folder holding both files."
            )
        return found
    looked = []
    base = Path(base).resolve()
    candidates = [base] if base.is_dir() else []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    candidates += [p for p in base.parents if (p / "comfy").is_dir()]
    candidates += [p for p in Path(__file__).resolve().parents if (p / "comfy").is_dir()]
    for c in candidates:
        found = _tokenizer_in(c)
        if found is not None:
            log.info("CLIP tokenizer: %s", found)
            return found
        looked.append(str(c))
    raise TokenizerError(
        f"{base}: no CLIP tokenizer files (vocab.json + merges.txt) found; single-file checkpoints do not contain them. "
        f"Looked in: {', '.join(looked) or 'nowhere (no diffusers folder, no COMFYUI_PATH, no ComfyUI install around the file)'}. "
        "Pass --tokenizer DIR with a folder that has both files: ComfyUI's comfy/sd1_tokenizer/, the tokenizer/ folder of any "
        "SD diffusers model, or the files of the Hugging Face repository openai/clip-vit-large-patch14 "
        "(SD1.x, SD2.x and SDXL all use this vocabulary); or set COMFYUI_PATH to a ComfyUI install."
    )


__all__ = ["ShardedSource", "component_weights", "find_tokenizer_dir", "read_json"]
