"""Annotator weight files: a manifest per model, lookup in the user's folders, verified download, safe loading.

Offline first: nothing is downloaded unless asked (`fetch`, or `auto_download=True` / CNS_AUTO_DOWNLOAD=1),
and never when CNS_OFFLINE=1. A downloaded file is written to `<name>.part`, checked against its
SHA-256, then renamed: a half-written or wrong file is never used.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ._core import ControlNetError, open_checkpoint

log = logging.getLogger(__name__)

FETCH_COMMAND = "python -m annotators fetch {name}"


class AnnotatorWeightsError(ControlNetError):
    """A weight file is missing, fails its hash check, or cannot be read."""


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: Optional[str]  # None: not known here; such a file is never auto-downloaded
    size: Optional[int]
    licence: str
    model: str  # which annotator uses it

    @property
    def fetch_command(self) -> str:
        return FETCH_COMMAND.format(name=self.filename)


MANIFEST: dict[str, WeightFile] = {}


def register(*files: WeightFile) -> None:
    for f in files:
        MANIFEST[f.filename] = f


def default_dirs() -> list[Path]:
    """CNS_ANNOTATOR_DIR, then ./models/annotators; ComfyUI adds its 'annotators' model folders (see nodes)."""
    out = []
    if os.environ.get("CNS_ANNOTATOR_DIR"):
        out += [Path(p) for p in os.environ["CNS_ANNOTATOR_DIR"].split(os.pathsep)]
    out.append(Path.cwd() / "models" / "annotators")
    return out


_EXTRA_DIRS: list[Path] = []


def add_search_dir(path: os.PathLike) -> None:
    p = Path(path)
    if p not in _EXTRA_DIRS:
        _EXTRA_DIRS.append(p)


def search_dirs() -> list[Path]:
    return _EXTRA_DIRS + default_dirs()


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, spec: WeightFile) -> None:
    if spec.sha256 is None:
        return
    got = sha256_of(path)
    if got != spec.sha256:
        raise AnnotatorWeightsError(
            f"{path}: SHA-256 {got[:16]}... does not match the published {spec.filename} ({spec.sha256[:16]}...). "
            f"The file is damaged or a different one; delete it and run '{spec.fetch_command}' (or download it from {spec.url}). "
            f"If it is your own fine-tuned or re-saved copy, set CNS_SKIP_HASH_CHECK=1 to use it as it is."
        )


def find(filename: str, dirs: Optional[Sequence[os.PathLike]] = None, *, verify_hash: bool = True, auto_download: Optional[bool] = None) -> Path:
    """Path of a known weight file in the search folders (verified against the manifest), or a clear error."""
    spec = MANIFEST.get(filename)
    folders = [Path(d) for d in (dirs if dirs is not None else search_dirs())]
    if os.environ.get("CNS_SKIP_HASH_CHECK") == "1":  # for users' own fine-tuned or re-saved files
        verify_hash = False
    for d in folders:
        p = d / filename
        if p.is_file():
            if verify_hash and spec is not None:
                verify(p, spec)
            return p
    if auto_download is None:
        auto_download = os.environ.get("CNS_AUTO_DOWNLOAD") == "1"
    if auto_download and spec is not None and folders:
        return fetch(filename, folders[0])
    where = ", ".join(str(d) for d in folders) or "(no folder configured)"
    how = f" Run '{spec.fetch_command}' or download it from {spec.url}." if spec else ""
    raise AnnotatorWeightsError(f"annotator weights '{filename}' not found. Put the file in one of: {where}.{how}")


def fetch(filename: str, dest: os.PathLike, *, opener=urllib.request.urlopen) -> Path:
    """Download a manifest file into `dest`: `.part` first, verify, then rename. Refused offline or without a known hash."""
    spec = MANIFEST.get(filename)
    if spec is None:
        raise AnnotatorWeightsError(f"'{filename}' is not in the annotator manifest; known files: {sorted(MANIFEST)}.")
    if os.environ.get("CNS_OFFLINE") == "1":
        raise AnnotatorWeightsError(f"offline mode (CNS_OFFLINE=1): not downloading {filename}; download {spec.url} into {dest} yourself.")
    if spec.sha256 is None:
        raise AnnotatorWeightsError(f"no SHA-256 is known for {filename}, so it is not downloaded automatically; download {spec.url} into {dest} yourself.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final, part = dest / filename, dest / (filename + ".part")
    h = hashlib.sha256()
    log.info("downloading %s from %s", filename, spec.url)
    try:
        with opener(spec.url) as r, open(part, "wb") as f:
            while block := r.read(1 << 20):
                h.update(block)
                f.write(block)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise AnnotatorWeightsError(f"download of {filename} from {spec.url} failed: {e}. Download it into {dest} yourself.") from None
    if h.hexdigest() != spec.sha256:
        part.unlink(missing_ok=True)
        raise AnnotatorWeightsError(f"downloaded {filename} has SHA-256 {h.hexdigest()[:16]}..., expected {spec.sha256[:16]}...; it was deleted.")
    os.replace(part, final)
    return final


def load_state_dict(path: os.PathLike, *, strip_prefixes: Iterable[str] = (), unwrap: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, loaded safely (safetensors, or torch.load(weights_only=True)).

    `unwrap`: container keys such as 'state_dict' or 'model' are handled by the reader; `strip_prefixes`
    removes e.g. 'module.' from every key.
    """
    src = open_checkpoint(path)
    sd = {k: src.get(k) for k in src.keys()}
    for p in strip_prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], path: os.PathLike, what: str) -> torch.nn.Module:
    """Strict load with a message naming the file and the first missing/unexpected keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise AnnotatorWeightsError(
            f"{path}: not a {what} weight file. Missing {len(missing)} keys {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}, "
            f"wrong shapes {bad[:5]}. Use the official file (see the README's annotator table)."
        )
    module.load_state_dict(sd, strict=True)
    return module


def load_network(module: torch.nn.Module, path: os.PathLike, what: str, *, strip_prefixes: Iterable[str] = ("module.",),
                 device="cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Read `path` safely, load it strictly into `module`, and make it an inference network on device/dtype."""
    sd = load_state_dict(path, strip_prefixes=strip_prefixes)
    load_into(module, sd, path, what)
    from .base import inference_network

    return inference_network(module, device, dtype)
