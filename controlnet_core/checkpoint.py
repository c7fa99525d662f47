"""Lazy, safe access to the tensors of a weight file.

Why not `safetensors.torch.load_file`: it copies every tensor of the file, so a v1.0 checkpoint (ControlNet +
UNet + VAE + CLIP) would be read entirely to keep a quarter of it. Here each tensor is read into its own buffer,
only when asked for.

`.safetensors` files are opened with the library's own `safe_open`: its header validation is the reference
(negative or overlapping offsets, bytes no tensor covers, a shape that does not fit its byte range, metadata that
is not strings), where a parser of our own accepted several such files. Our code is kept for what the library
cannot say: `_sniff` names the usual non-checkpoints (HTML page, Git-LFS pointer, empty file), which the library
reports only as a bad header. Pickled checkpoints are opened with `torch.load(weights_only=True, mmap=True)`,
which never runs code and reads lazily.
"""
from __future__ import annotations

import abc
import functools
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from .errors import NotACheckpointError, OutputPathError, UnsafeCheckpointError

PathLike = Union[str, os.PathLike]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

# The library's messages that mean "the bytes end before the header says they do" (or the header length is garbage).
_TRUNCATED = ("header too small", "invalid header length", "header too large", "not fully covered")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


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

    def stored_dtype(self, key: str) -> torch.dtype:
        """The dtype as stored (before any conversion); sources that know it without reading the tensor override this."""
        return self.get(key).dtype

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

    def stored_dtype(self, key: str) -> torch.dtype:
        return self.sd[key].dtype

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self.sd[key]
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


@functools.lru_cache(maxsize=None)
def _has_pread_backend() -> bool:
    """Whether the installed safetensors reads with `pread` (newer releases); older ones only memory-map."""
    from safetensors import safe_open

    return "backend" in (getattr(safe_open, "__text_signature__", None) or "")


class SafetensorsSource(TensorSource):
    """A `.safetensors` file, validated and read tensor by tensor by the `safetensors` library.

    Where the library has the `pread` backend, one handle stays open and each tensor is read into its own buffer.
    Otherwise the library memory-maps the whole file: then each read opens the file anew and copies the tensor out,
    so that no returned tensor keeps the mapping alive (a mapped file cannot be replaced or deleted on Windows,
    and its pages would count twice in memory while the model holds the copies).
    """

    def __init__(self, path: Path, *, pread: Optional[bool] = None):
        self.path = path
        self._pread = _has_pread_backend() if pread is None else pread
        handle = self._open()
        self.metadata = dict(handle.metadata() or {})
        self._entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        for key in handle.keys():
            view = handle.get_slice(key)
            self._entries[key] = (view.get_dtype(), tuple(view.get_shape()))
        self._handle = handle if self._pread else None

    def _open(self):
        from safetensors import SafetensorError, safe_open

        try:
            if self._pread:
                return safe_open(str(self.path), framework="pt", backend="pread")
            return safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as e:
            text = str(e).replace("Error while deserializing header: ", "")
            size = self.path.stat().st_size if self.path.is_file() else 0
            if any(m in text for m in _TRUNCATED):
                hint = "the file is truncated (an interrupted download?) or corrupt"
            else:
                hint = "the file is corrupt"
            raise NotACheckpointError(
                f"{self.path}: not a valid .safetensors file ({text}; {size} bytes): {hint}. Download it again."
            ) from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def stored_dtype(self, key: str) -> torch.dtype:
        name = self._entries[key][0]
        return _ST_DTYPES[name] if name in _ST_DTYPES else self.get(key).dtype

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            if self._handle is not None:
                t = self._handle.get_tensor(key)
            else:
                with self._open() as handle:
                    t = handle.get_tensor(key)
                t = t.clone() if dtype is None or dtype == t.dtype else t.to(dtype)
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise NotACheckpointError(f"{self.path}: could not read tensor '{key}' ({e}); the file is corrupt or was changed while open.") from None
        return t if dtype is None or dtype == t.dtype else t.to(dtype)


class PickleSource(TensorSource):
    """`.pth/.ckpt/.bin` opened with `weights_only=True`: tensors and plain containers only."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        obj = self._load(path)
        self.sd = _flatten_state_dict(obj, path)

    @staticmethod
    def _load(path: Path):
        from safetensors import SafetensorError

        errors = []
        for mmap in (True, False):
            try:
                if mmap:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                with open(path, "rb") as f:  # a file object: torch.load hands any path named .safetensors to safetensors
                    return torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                refused = refused_pickle_global(e)
                if refused is not None:
                    raise UnsafeCheckpointError(
                        f"{path}: refused: this pickle would import {refused}, which is not a tensor or a plain container, "
                        "and unpickling it could run code. Use a .safetensors version of the file."
                    ) from None
                errors.append(_first_line(e))
            except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, SafetensorError) as e:
                errors.append(_first_line(e))
        raise NotACheckpointError(f"{path}: could not be read as a PyTorch checkpoint ({errors[-1][:200]}). The file is corrupt or truncated; download it again.")

    def keys(self) -> list[str]:
        return list(self.sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.sd[key].shape)

    def stored_dtype(self, key: str) -> torch.dtype:
        return self.sd[key].dtype

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self.sd[key]
        if dtype is not None and t.dtype != dtype:
            return t.to(dtype)
        return t.clone()  # detach from the file mapping


def _first_line(error: BaseException) -> str:
    text = _ANSI.sub("", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def refused_pickle_global(error: BaseException) -> Optional[str]:
    """What a `weights_only` load refused (e.g. 'posix.system'), or None when `error` is no such refusal.

    torch's own message advises turning the weights-only protection off and carries terminal colour codes; our messages
    name the object instead and never repeat that advice (it would run the file's code)."""
    text = _ANSI.sub("", str(error))
    if "weights_only" not in text and "GLOBAL" not in text and "Unsupported global" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    return f"'{found[1]}'" if found else "objects other than tensors and plain containers"


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
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise NotACheckpointError(f"{path}: cannot be read ({e.strerror or e}).") from None
    if size == 0:
        raise NotACheckpointError(f"{path}: the file is empty (0 bytes). The download failed; download it again.")
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
    if len(head) >= 9 and head[8:9] == b"{":  # before the pickle test: a header length can begin with byte 0x80
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise NotACheckpointError(
        f"{path}: not a recognised weight file (first bytes {head[:16]!r}). Expected .safetensors or a PyTorch .pth/.ckpt/.bin; "
        "the file may be corrupt or of another kind."
    )


def open_checkpoint(path: PathLike) -> TensorSource:
    """Open a weight file lazily; raises a `ControlNetError` subclass for anything that is not one."""
    path = Path(path)
    if path.is_dir():
        raise NotACheckpointError(f"{path}: is a folder; expected a weight file (.safetensors, .pth, .ckpt or .bin).")
    if not path.is_file():
        raise NotACheckpointError(f"{path}: no such file.")
    kind = _sniff(path)
    if kind == "safetensors":
        return SafetensorsSource(path)
    return PickleSource(path)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output file that would replace a folder, or an existing file unless asked to."""
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder; the output here is one file (give a name such as {path / 'controlnet.safetensors'}).")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{path}: already exists; choose another name, or overwrite it (--overwrite).")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, then move the temporary file onto `path`; the temporary file is removed whatever happens, so a
    failed save leaves neither a half-written file nor a stray `.part`. OS errors become `OutputPathError`."""
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputPathError(f"{path}: could not be written ({e.strerror or e}).") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None, *,
                     overwrite: bool = True) -> None:
    """Save atomically (see `write_atomically`); `overwrite=False` refuses an existing file before any work."""
    from safetensors.torch import save_file

    path = Path(path)
    check_output_file(path, overwrite)
    sd = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(sd, str(tmp), metadata=dict(metadata or {})))
