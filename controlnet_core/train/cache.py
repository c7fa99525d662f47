"""Disk caches for text embeddings and VAE latents: encode once, train many epochs.

Why: the text encoder and the VAE encoder are frozen, so their outputs for a given prompt or image never
change; on SD1.5 the VAE encoder alone costs about as much as a ControlNet forward. With a cache the first
epoch encodes and every later epoch (and every later run with the same data and encoders) reads.

Keys:
- latents: the target file's path, modification time (ns) and size, the pixel size it was resized to, and
  the encoder's identity (so an edited image, another resolution or another VAE is a miss, never stale);
- text: the prompt itself and the encoder's identity. The empty prompt "" is an ordinary entry, and
  `encode_with_drop` encodes the real prompts even when the paper's empty-prompt replacement empties
  them this time, so later epochs find every prompt (and "") cached.
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

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def encoder_identity(encoder: object) -> str:
    """A string that changes when the encoder would encode differently.

    Modules: class name and a hash of every parameter and buffer (dtype, shape, bytes). Plain functions:
    their qualified name and bytecode. Anything else: its `cache_identity` attribute, else its type name
    (give such encoders a `cache_identity`, or pass `identity=` to the cache).
    """
    explicit = getattr(encoder, "cache_identity", None)
    if explicit:
        return str(explicit)
    if isinstance(encoder, torch.nn.Module):
        h = hashlib.sha256(type(encoder).__qualname__.encode())
        for name, t in list(encoder.state_dict().items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return f"{type(encoder).__qualname__}-{h.hexdigest()[:24]}"
    code = getattr(encoder, "__code__", None)
    if code is not None:
        h = hashlib.sha256(code.co_code + repr(code.co_consts).encode())
        return f"{getattr(encoder, '__module__', '')}.{encoder.__qualname__}-{h.hexdigest()[:16]}"
    log.warning("cache: no identity for encoder %r; using its type name. Give it a cache_identity attribute.", encoder)
    return type(encoder).__qualname__


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def file_key(path: PathLike, size: Sequence[int]) -> str:
    """Cache key part for an image file resized to `size` (h, w): path + mtime + byte size + pixel size."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_mtime_ns}|{st.st_size}|{'x'.join(map(str, size))}"


class _Store:
    """One safetensors file per entry under `root`, fanned out by the first two hex digits."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str) -> Optional[torch.Tensor]:
        p = self.path(digest)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))["value"]
        except Exception as e:  # noqa: BLE001 - a damaged entry is re-encoded, not fatal
            log.warning("cache: %s is unreadable (%s); encoding again", p, e)
            return None

    def put(self, digest: str, value: torch.Tensor) -> None:
        p = self.path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
        save_file({"value": value.detach().cpu().contiguous()}, str(tmp))
        os.replace(tmp, p)


class TextCache:
    """`encode_text` with a disk cache: prompts -> (B, tokens, dim), each prompt encoded at most once."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], root: PathLike, identity: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", memory_entries: int = 256):
        self.encode = encode
        self.identity = identity or encoder_identity(encode)
        self.store = _Store(Path(root) / "text")
        self.device = torch.device(device)  # where the embeddings are returned (the training device)
        # recently used entries on the CPU, so "" and repeated prompts need no disk read; bounded, because an SD1.5
        # embedding is 236 kB and a dataset can have 50k distinct captions
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memory_entries = memory_entries

    def _remember(self, key: str, value: torch.Tensor) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.memory_entries:
            self.memory.popitem(last=False)

    def _key(self, prompt: str) -> str:
        return _digest("text", self.identity, prompt)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        keys = [self._key(p) for p in prompts]
        found: dict[str, torch.Tensor] = {}
        for k in keys:
            if k in found:
                continue
            v = self.memory.get(k)
            if v is None:
                v = self.store.get(k)
            if v is not None:
                found[k] = v
        todo = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in found))
        if todo:
            out = self.encode(todo)
            for p, row in zip(todo, out):
                k = self._key(p)
                self.store.put(k, row)
                found[k] = row.detach().cpu().clone()
        for k, v in found.items():
            self._remember(k, v)
        return torch.stack([found[k] for k in keys]).to(self.device)

    def encode_with_drop(self, prompts: Sequence[str], keep: Sequence[bool]) -> torch.Tensor:
        """Embeddings of `prompts`, with "" where keep is False; every real prompt and "" end up cached."""
        full = self(list(prompts) + [""])
        empty = full[-1]
        return torch.stack([row if k else empty for row, k in zip(full[:-1], keep)])


class LatentCache:
    """`encode_image` with a disk cache keyed by the source file (see `file_key`)."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], root: PathLike, identity: Optional[str] = None):
        self.encode = encode
        self.identity = identity or encoder_identity(encode)
        self.store = _Store(Path(root) / "latents")

    def __call__(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1]; keys: one `file_key` per image."""
        digests = [_digest("latent", self.identity, k) for k in keys]
        rows: list[Optional[torch.Tensor]] = [self.store.get(d) for d in digests]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            # the whole batch when everything is missing: the same call as without a cache
            out = self.encode(images if len(missing) == len(rows) else images[missing])
            for i, row in zip(missing, out):
                self.store.put(digests[i], row)
                rows[i] = row.detach()
        return torch.stack([r.to(images.device) for r in rows])


__all__ = ["TextCache", "LatentCache", "encoder_identity", "file_key"]
