"""Disk caches for text embeddings and VAE latents: encode once, train many epochs.

Why: the text encoder and the VAE encoder are frozen, so their outputs for a given prompt or image never
change; on SD1.5 the VAE encoder alone costs about as much as a ControlNet forward. With a cache the first
epoch encodes and every later epoch (and every later run with the same data and encoders) reads.

Keys:
- latents: the target file's path, modification time (ns) and size, the pixel size it was resized to, and
  the encoder's identity (so an edited image, another resolution or another VAE is a miss, never stale);
- text: the prompt itself and the encoder's identity. The empty prompt "" is an ordinary entry, and
  `encode_with_drop` encodes the real prompts even when the paper's empty-prompt replacement empties
  them this time, so later epochs find every prompt (and "") cached. SDXL's encoders return (context, y);
  such an entry holds both ("value" and "y"), a single-tensor entry only "value", as it always has. The
  identities of SDXL encoders include the size that `y` embeds.
Entries are one safetensors file each, written to a temporary name and renamed (atomic): a crash or two
processes writing the same entry never leave a half-written file. A VAE that samples its posterior is
cached at one sample; that is the usual trade (and what a deterministic encoder gives anyway).
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from ..errors import ControlNetError
from ..identity import encoder_identity, module_identity

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def file_key(path: PathLike, size: Sequence[int]) -> str:
    """Cache key part for an image file resized to `size` (h, w): path + mtime + byte size + pixel size."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_mtime_ns}|{st.st_size}|{'x'.join(map(str, size))}"


Text = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # context, or (context, y) for SDXL-type bases


class _Store:
    """One safetensors file per entry under `root`, fanned out by the first two hex digits. An entry is a
    small dict of named tensors: "value" (a latent, or a text context) and, for SDXL text, "y"."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str) -> Optional[dict[str, torch.Tensor]]:
        p = self.path(digest)
        if not p.is_file():
            return None
        try:
            entry = load_file(str(p))
            if "value" not in entry:
                raise KeyError("no 'value' tensor")
            return entry
        except Exception as e:  # noqa: BLE001 - a damaged entry is re-encoded, not fatal
            log.warning("cache: %s is unreadable (%s); encoding again", p, e)
            return None

    def put(self, digest: str, tensors: dict[str, torch.Tensor]) -> None:
        p = self.path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        # clone: an encoder's pieces may be views of one tensor, which safetensors refuses to write
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, p)


def _text_entry(value: Text) -> dict[str, torch.Tensor]:
    """On disk: {"value": context} as before SDXL support (old entries stay readable), plus "y" for a pair."""
    return {"value": value[0], "y": value[1]} if isinstance(value, tuple) else {"value": value}


def _text_value(entry: dict[str, torch.Tensor]) -> Text:
    return (entry["value"], entry["y"]) if "y" in entry else entry["value"]


def _cpu_copy(value: Text) -> Text:
    if isinstance(value, tuple):
        return tuple(v.detach().cpu().clone() for v in value)  # type: ignore[return-value]
    return value.detach().cpu().clone()


class TextCache:
    """`encode_text` with a disk cache: prompts -> (B, tokens, dim), each prompt encoded at most once.

    Encoders of SDXL-type bases return (context, y) (y: the pooled text embedding and size embedding the UNet's
    label input takes); the cache then stores both per prompt and returns the pair, batched the same way."""

    def __init__(self, encode: Callable[[list[str]], Text], root: PathLike, identity: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", memory_entries: int = 256):
        self.encode = encode
        self.identity = identity or encoder_identity(encode)
        self.store = _Store(Path(root) / "text")
        self.device = torch.device(device)  # where the embeddings are returned (the training device)
        # recently used entries on the CPU, so "" and repeated prompts need no disk read; bounded, because an SD1.5
        # embedding is 236 kB and a dataset can have 50k distinct captions
        self.memory: OrderedDict[str, Text] = OrderedDict()
        self.memory_entries = memory_entries
        self.pairs: Optional[bool] = None  # whether the encoder returns (context, y); known after the first encode

    def _remember(self, key: str, value: Text) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.memory_entries:
            self.memory.popitem(last=False)

    def _key(self, prompt: str) -> str:
        return _digest("text", self.identity, prompt)

    def _lookup(self, key: str) -> Optional[Text]:
        v = self.memory.get(key)
        if v is None:
            entry = self.store.get(key)
            v = _text_value(entry) if entry is not None else None
        if v is not None and self.pairs is not None and isinstance(v, tuple) != self.pairs:
            return None  # written by an encoder of the other kind under the same identity: encode again
        return v

    def __call__(self, prompts: Sequence[str]) -> Text:
        return self._encode(prompts, retry=True)

    def _encode(self, prompts: Sequence[str], retry: bool) -> Text:
        keys = [self._key(p) for p in prompts]
        found: dict[str, Text] = {}
        for k in keys:
            if k not in found:
                v = self._lookup(k)
                if v is not None:
                    found[k] = v
        if len({isinstance(v, tuple) for v in found.values()}) > 1:  # mixed kinds on disk: trust none of them
            found.clear()
        todo = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in found))
        if todo:
            out = self.encode(todo)
            self.pairs = isinstance(out, tuple)
            for p, row in zip(todo, zip(*out) if self.pairs else out):
                k = self._key(p)
                value: Text = tuple(row) if self.pairs else row  # type: ignore[assignment]
                self.store.put(k, _text_entry(value))
                found[k] = _cpu_copy(value)
            if any(isinstance(v, tuple) != self.pairs for v in found.values()):
                if not retry:
                    raise ControlNetError("TextCache: the text encoder returned a tensor for some calls and a (context, y) pair "
                                          "for others; an encoder must return one kind.")
                return self._encode(prompts, retry=False)  # entries of the other kind were read before the kind was known: now they miss
        for k, v in found.items():
            self._remember(k, v)
        values = [found[k] for k in keys]
        if isinstance(values[0], tuple):
            return tuple(torch.stack([v[i] for v in values]).to(self.device) for i in range(2))  # type: ignore[return-value]
        return torch.stack(values).to(self.device)  # type: ignore[arg-type]

    def encode_with_drop(self, prompts: Sequence[str], keep: Sequence[bool]) -> Text:
        """Embeddings of `prompts`, with "" where keep is False; every real prompt and "" end up cached."""
        full = self(list(prompts) + [""])
        parts = full if isinstance(full, tuple) else (full,)
        out = tuple(torch.stack([row if k else part[-1] for row, k in zip(part[:-1], keep)]) for part in parts)
        return out if isinstance(full, tuple) else out[0]  # type: ignore[return-value]


class LatentCache:
    """`encode_image` with a disk cache keyed by the source file (see `file_key`)."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], root: PathLike, identity: Optional[str] = None):
        self.encode = encode
        self.identity = identity or encoder_identity(encode)
        self.store = _Store(Path(root) / "latents")

    def __call__(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1]; keys: one `file_key` per image."""
        digests = [_digest("latent", self.identity, k) for k in keys]
        rows: list[Optional[torch.Tensor]] = [self._get(d) for d in digests]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            # the whole batch when everything is missing: the same call as without a cache
            out = self.encode(images if len(missing) == len(rows) else images[missing])
            for i, row in zip(missing, out):
                self.store.put(digests[i], {"value": row})
                rows[i] = row.detach()
        return torch.stack([r.to(images.device) for r in rows])

    def _get(self, digest: str) -> Optional[torch.Tensor]:
        entry = self.store.get(digest)
        return entry["value"] if entry is not None else None


__all__ = ["TextCache", "LatentCache", "encoder_identity", "file_key", "module_identity"]
