"""Annotator weight files: a manifest per model, lookup in the user's folders, verified download, safe loading.

Offline first: nothing is downloaded unless asked (`fetch`, or `auto_download=True` / CNS_AUTO_DOWNLOAD=1),
and never when CNS_OFFLINE=1. A downloaded file is written to `<name>.part`, checked against its
SHA-256, then renamed: a half-written or wrong file is never used.

A download never hangs and never leaves debris: connecting and every read give up after CNS_DOWNLOAD_TIMEOUT
seconds without data (default 30; `urlopen` alone waits forever on a silent server), an attempt still receiving
after CNS_DOWNLOAD_DEADLINE seconds gives up too (default 3600; a server that trickles a byte every few seconds is
never silent long enough for the first limit), a connection that closes before its Content-Length is a failure
(Python's `read(n)` reports it as a normal end), failed attempts are retried CNS_DOWNLOAD_ATTEMPTS times in all
(default 3) after waits of CNS_DOWNLOAD_BACKOFF seconds, doubling (default 2), and the `.part` file is deleted
whatever stops the download, Ctrl-C included.

A file's SHA-256 is computed once per state of the file (path, size, modification and change times, inode) and kept
for the life of the process (`file_sha256`): an unchanged file is never hashed twice, a changed one always is.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ._core import ControlNetError, open_checkpoint, strict_fill

log = logging.getLogger(__name__)

FETCH_COMMAND = "python -m annotators fetch {name}"


class AnnotatorWeightsError(ControlNetError):
    """A weight file is missing, fails its hash check, or cannot be read."""


class DownloadError(AnnotatorWeightsError):
    """A download that failed (after its retries) or delivered other bytes than the published file."""


# (environment variable, default): seconds without data, seconds per attempt in all, attempts in all, first wait
# between attempts in seconds. Why an hour per attempt: the largest annotator file (body_pose_model.pth, 209 MB) at
# 100 kB/s, a very slow but working connection, takes 35 minutes.
TIMEOUT = ("CNS_DOWNLOAD_TIMEOUT", 30.0)
DEADLINE = ("CNS_DOWNLOAD_DEADLINE", 3600.0)
ATTEMPTS = ("CNS_DOWNLOAD_ATTEMPTS", 3)
BACKOFF = ("CNS_DOWNLOAD_BACKOFF", 2.0)
RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}  # the server may answer later; other HTTP errors stay errors


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

# Where lllyasviel's ControlNet 1.1 annotator weights are published (every network here but Depth Anything's)
ANNOTATORS_REPO = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"


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


def search_dirs() -> list[Path]:
    return default_dirs()


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# realpath -> (stamp, SHA-256): the digest of each file in the state it was hashed in (see file_sha256)
_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}
_DIGESTS_LOCK = threading.Lock()


def file_stamp(path: os.PathLike) -> tuple[int, ...]:
    """What identifies one state of a file without reading it: (size, mtime ns, ctime ns, inode, device).

    Why the change time too: a rewrite that keeps the size and sets the old modification time back (`touch -d`,
    a copy with `cp -p`) still moves the change time, which only the kernel sets."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def file_sha256(path: os.PathLike) -> str:
    """SHA-256 of a file, hashed once per state of the file (`file_stamp`) in this process.

    A file whose stamp changed while it was being read is hashed again next time: its digest is returned but not
    kept, since it may mix the old and the new contents."""
    key = os.path.realpath(path)
    before = file_stamp(key)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known is not None and known[0] == before:
        return known[1]
    digest = sha256_of(Path(key))
    if file_stamp(key) == before:
        with _DIGESTS_LOCK:
            _DIGESTS[key] = (before, digest)
    return digest


def verify(path: Path, spec: WeightFile) -> None:
    """Raise AnnotatorWeightsError unless `path` has the published SHA-256 of `spec` (files without one pass).

    Hashes the file only when it is new to this process or changed since it was last hashed (`file_sha256`)."""
    if spec.sha256 is None:
        return
    got = file_sha256(path)
    if got != spec.sha256:
        raise AnnotatorWeightsError(
            f"{path}: SHA-256 {got[:16]}... does not match the published {spec.filename} ({spec.sha256[:16]}...). "
            f"The file is damaged or a different one; delete it and run '{spec.fetch_command}' (or download it from {spec.url}). "
            f"If it is your own fine-tuned or re-saved copy, set CNS_SKIP_HASH_CHECK=1 to use it as it is."
        )


def hash_check_wanted() -> bool:
    """False when CNS_SKIP_HASH_CHECK=1: users' own fine-tuned or re-saved files are then taken as they are."""
    return os.environ.get("CNS_SKIP_HASH_CHECK") != "1"


def _folders(dirs: Optional[Sequence[os.PathLike]]) -> list[Path]:
    return [Path(d) for d in (dirs if dirs is not None else search_dirs())]


def locate(filename: str, dirs: Optional[Sequence[os.PathLike]] = None) -> Optional[Path]:
    """The first `dirs / filename` that is a file (search_dirs() when dirs is None), or None; reads nothing."""
    for d in _folders(dirs):
        p = d / filename
        if p.is_file():
            return p
    return None


def find(filename: str, dirs: Optional[Sequence[os.PathLike]] = None, *, verify_hash: bool = True, auto_download: Optional[bool] = None) -> Path:
    """Path of a known weight file in the search folders (verified against the manifest), or a clear error."""
    spec = MANIFEST.get(filename)
    folders = _folders(dirs)
    if not hash_check_wanted():
        verify_hash = False
    p = locate(filename, folders)
    if p is not None:
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


def fetch(filename: str, dest: os.PathLike, *, opener=urllib.request.urlopen, timeout: Optional[float] = None,
          attempts: Optional[int] = None, backoff: Optional[float] = None, deadline: Optional[float] = None) -> Path:
    """Download a manifest file into `dest`: `.part` first, verify, then rename. Refused offline or without a known hash.

    timeout (seconds without data), deadline (seconds per attempt: checked after each read, so an attempt ends
    within deadline + timeout), attempts (in all) and backoff (first wait, doubling) default to the CNS_DOWNLOAD_*
    environment variables (see the module docstring). Timeouts, deadlines passed, refused or dropped connections,
    short bodies and HTTP 408/429/5xx are retried; another HTTP error or a wrong SHA-256 is not (the server would
    send the same again). Every failure deletes the `.part` file and raises `DownloadError` naming the URL, the
    file and where to put a copy downloaded by hand.
    """
    spec = MANIFEST.get(filename)
    if spec is None:
        raise AnnotatorWeightsError(f"'{filename}' is not in the annotator manifest; known files: {sorted(MANIFEST)}.")
    if os.environ.get("CNS_OFFLINE") == "1":
        raise AnnotatorWeightsError(f"offline mode (CNS_OFFLINE=1): not downloading {filename}; download {spec.url} into {dest} yourself.")
    if spec.sha256 is None:
        raise AnnotatorWeightsError(f"no SHA-256 is known for {filename}, so it is not downloaded automatically; download {spec.url} into {dest} yourself.")
    timeout = _setting(TIMEOUT, timeout, float)
    deadline = _setting(DEADLINE, deadline, float)
    attempts = max(1, _setting(ATTEMPTS, attempts, int))
    backoff = _setting(BACKOFF, backoff, float)
    if not timeout > 0 or not deadline > 0 or not backoff >= 0:
        raise AnnotatorWeightsError(f"download timeout and deadline must be > 0 s and backoff >= 0 s; got {timeout}, {deadline} and {backoff} "
                                    f"(see {TIMEOUT[0]}, {DEADLINE[0]}, {BACKOFF[0]}).")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final, part = dest / filename, dest / (filename + ".part")
    by_hand = f"Download it yourself and place it at {final} (SHA-256 {spec.sha256}), or try again later."
    attempt = 0
    while True:
        attempt += 1
        log.info("downloading %s from %s (attempt %d of %d)", filename, spec.url, attempt, attempts)
        try:
            digest = _download(spec.url, part, opener, timeout, deadline)
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, resets, IncompleteRead
            part.unlink(missing_ok=True)
            why = _reason(e, timeout)
            code = getattr(e, "code", None)
            if attempt == attempts or (code is not None and code not in RETRY_HTTP):
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                raise DownloadError(f"download of {filename} from {spec.url} failed{tried}: {why}. {by_hand}") from None
            wait = backoff * 2 ** (attempt - 1)
            log.warning("download of %s from %s failed (%s); attempt %d of %d in %g s", filename, spec.url, why, attempt + 1, attempts, wait)
            time.sleep(wait)
            continue
        except BaseException:  # Ctrl-C, or anything unexpected: no .part is left behind either
            part.unlink(missing_ok=True)
            raise
        if digest != spec.sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(f"downloaded {filename} from {spec.url} has SHA-256 {digest[:16]}..., expected {spec.sha256[:16]}...; "
                                f"it was deleted (the server sent another file: an error page, a login page or a newer version). {by_hand}")
        os.replace(part, final)
        return final


class DeadlinePassed(TimeoutError):
    """An attempt still receiving data when its deadline passed (retried like a timeout)."""

    def __init__(self, deadline: float, received: int, length: Optional[str]):
        super().__init__(f"still receiving after {deadline:g} s")
        self.deadline, self.received, self.length = deadline, received, length


def _download(url: str, part: Path, opener, timeout: float, deadline: float) -> str:
    """Stream `url` into `part`; the SHA-256 of what came. A body shorter than its Content-Length raises IncompleteRead;
    an attempt past `deadline` seconds raises DeadlinePassed.

    Why `read1`: `read(n)` waits until n bytes have come, so on a trickling server it would not return (nor let the
    deadline be checked) for hours; `read1(n)` returns whatever one receive brought."""
    h = hashlib.sha256()
    received = 0
    start = time.monotonic()
    with opener(url, timeout=timeout) as r, open(part, "wb") as f:
        length = (getattr(r, "headers", None) or {}).get("Content-Length")
        read = getattr(r, "read1", r.read)
        while block := read(1 << 20):
            h.update(block)
            f.write(block)
            received += len(block)
            if time.monotonic() - start > deadline:
                raise DeadlinePassed(deadline, received, length)
    if length is not None and length.isdigit() and received < int(length):
        raise http.client.IncompleteRead(b"", int(length) - received)
    return h.hexdigest()


def _reason(e: BaseException, timeout: float) -> str:
    """One line on why an attempt failed."""
    if isinstance(e, DeadlinePassed):
        of = f" of {e.length}" if e.length is not None and e.length.isdigit() else ""
        return (f"still downloading after {e.deadline:g} s, {e.received} bytes{of} received "
                f"(raise {DEADLINE[0]}, in seconds, for a slow connection)")
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason  # the socket error under urllib's wrapper
    if isinstance(e, TimeoutError) or "timed out" in str(e):
        return f"no data for {timeout:g} s (raise CNS_DOWNLOAD_TIMEOUT for a slow connection)"
    if isinstance(e, http.client.IncompleteRead):
        return f"the connection closed with {e.expected} bytes still to come"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _setting(which: tuple, given, kind):
    """An explicit argument, else the environment variable, else the default."""
    if given is not None:
        return kind(given)
    var, default = which
    text = os.environ.get(var, "").strip()
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        raise AnnotatorWeightsError(f"{var}={text!r}: expected a number (default {default}).") from None


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
    """Strict load (`controlnet_core.loading.strict_fill`) with a message naming the file and the first missing,
    unexpected and wrongly shaped keys; the tensors are copied into the module's own dtype."""
    def mismatch(missing: list, unexpected: list, bad: list) -> str:
        return (
            f"{path}: not a {what} weight file. Missing {len(missing)} keys {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}, "
            f"wrong shapes {bad[:5]}. Use the official file (see the README's annotator table)."
        )

    shapes = {k: v.shape for k, v in sd.items()}
    return strict_fill(module, sd.get, sd.keys(), str(path), mismatch=mismatch, error=AnnotatorWeightsError, shapes=shapes, check_finite=False)


def load_network(module: torch.nn.Module, path: os.PathLike, what: str, *, strip_prefixes: Iterable[str] = ("module.",),
                 device="cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Read `path` safely, load it strictly into `module`, and make it an inference network on device/dtype."""
    sd = load_state_dict(path, strip_prefixes=strip_prefixes)
    load_into(module, sd, path, what)
    from .base import inference_network

    return inference_network(module, device, dtype)
