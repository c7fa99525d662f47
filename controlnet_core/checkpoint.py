"""Lazy, safe access to the tensors of a weight file.

Why not `safetensors.torch.load_file`: it maps the whole file and copies every tensor, so a v1.0
checkpoint (ControlNet + UNet + VAE + CLIP) would be read entirely to keep a quarter of it, and
peak memory doubles while the file's pages stay mapped. Here a `.safetensors` header is parsed and
each tensor is read straight into its own buffer, only when asked for. Pickled checkpoints are
opened with `torch.load(weights_only=True, mmap=True)`, which never runs code and reads lazily.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch

from .errors import NotACheckpointError, UnsafeCheckpointError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

_MAX_HEADER = 100 * 1024 * 1024


class TensorSource(abc.ABC):
    """Read-only mapping of tensor names to tensors, loaded on demand."""

    path: Optional[Path] = None
    metadata: dict[str, str]

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Abstract."""

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """Abstract."""

    @abc.abstractmethod
    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Abstract."""

    def __contains__(self, key: str) -> bool:
        return key in self._key_set()

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "<in-memory state dict>"


class DictSource(TensorSource):
    """A state dict already in memory (e.g. handed over by the host)."""

    def __init__(self, sd: Mapping[str, torch.Tensor], metadata: Optional[dict] = None, name: Optional[str] = None):
        self.sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.metadata = dict(metadata or {})
        self.path = Path(name) if name else None

    def keys(self) -> list[str]:
        return list(self.sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self.sd[key]
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise NotACheckpointError(f"{path}: file is {size} bytes, too short to be a .safetensors file. Download it again.")
            (n,) = struct.unpack("<Q", raw)
            if n == 0 or n > _MAX_HEADER or n + 8 > size:
                raise NotACheckpointError(
                    f"{path}: not a valid .safetensors file (header length {n} for a file of {size} bytes). "
                    "It is truncated or not a weight file; download it again."
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise NotACheckpointError(f"{path}: the .safetensors header is not valid JSON ({e}); the file is corrupt. Download it again.") from None
        self.metadata = dict(header.pop("__metadata__", None) or {})
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._data_start
        for key, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                start, end = info["data_offsets"]
                shape = tuple(info["shape"])
            except (KeyError, TypeError, ValueError):
                raise NotACheckpointError(f"{path}: tensor '{key}' has an unreadable header entry {info!r}; the file is corrupt.") from None
            if end > data_size or start > end:
                raise NotACheckpointError(
                    f"{path}: tensor '{key}' ends at byte {end} of the data, but the file holds only {data_size} data bytes: "
                    "the file is truncated (an interrupted download?). Download it again."
                )
            self._entries[key] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def stored_dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        stored, shape, start, end = self._entries[key]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            got = f.readinto(buf.numpy()) if end > start else 0
        if got != end - start:
            raise NotACheckpointError(f"{self.path}: could not read tensor '{key}' (got {got} of {end - start} bytes); the file is truncated.")
        t = buf.view(stored).reshape(shape)
        return t if dtype is None or dtype == stored else t.to(dtype)


class PickleSource(TensorSource):
    """`.pth/.ckpt/.bin` opened with `weights_only=True`: tensors and plain containers only."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        obj = self._load(path)
        self.sd = _flatten_state_dict(obj, path)

    @staticmethod
    def _load(path: Path):
        errors = []
        for mmap in (True, False):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as e:
                msg = str(e)
                if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
                    raise UnsafeCheckpointError(
                        f"{path}: this pickle needs more than tensors to load ({msg.splitlines()[0][:200]}). "
                        "Unpickling it could run arbitrary code, so it is refused. Use a .safetensors version of the file."
                    ) from None
                errors.append(msg)
            except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
                errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise NotACheckpointError(f"{path}: could not be read as a PyTorch checkpoint ({errors[-1][:200]}). The file is corrupt or truncated; download it again.")

    def keys(self) -> list[str]:
        return list(self.sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self.sd[key]
        if dtype is not None and t.dtype != dtype:
            return t.to(dtype)
        return t.clone()  # detach from the file mapping


def _flatten_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap the usual containers: {'state_dict': {...}}, {'model': {...}}, or a plain dict."""
    if isinstance(obj, torch.nn.Module):  # cannot happen with weights_only, kept for in-memory callers
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise NotACheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors.")
    for wrapper in ("state_dict", "model", "params"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise NotACheckpointError(f"{path}: contains no tensors.")
    return sd


def _sniff(path: Path) -> str:
    """Tell the container from the first bytes, and recognise the usual non-checkpoints."""
    size = path.stat().st_size
    if size == 0:
        raise NotACheckpointError(f"{path}: the file is empty (0 bytes). The download failed; download it again.")
    with open(path, "rb") as f:
        head = f.read(512)
    text = head.lstrip()
    if text.startswith(b"version https://git-lfs"):
        raise NotACheckpointError(
            f"{path}: this is a Git-LFS pointer file ({size} bytes), not the weights. "
            "It was cloned without LFS: run 'git lfs pull' in its repository or download the file itself."
        )
    lower = text[:200].lower()
    if lower.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<")) or b"<html" in lower:
        raise NotACheckpointError(
            f"{path}: this is a web page (HTML), not weights; the download saved a login or error page. "
            "Download the file again from its direct link."
        )
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise NotACheckpointError(
        f"{path}: not a recognised weight file (first bytes {head[:16]!r}). Expected .safetensors or a PyTorch .pth/.ckpt/.bin; "
        "the file may be corrupt or of another kind."
    )


def open_checkpoint(path: PathLike) -> TensorSource:
    """Open a weight file lazily; raises a `ControlNetError` subclass for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise NotACheckpointError(f"{path}: no such file.")
    kind = _sniff(path)
    if kind == "safetensors":
        return SafetensorsSource(path)
    return PickleSource(path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write through a temporary file so an interrupted save never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)


def iter_prefixed(source: TensorSource, prefix: str) -> Iterator[str]:
    return (k for k in source.keys() if k.startswith(prefix))
