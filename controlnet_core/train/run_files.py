"""A training run's files on disk: nothing replaced without an explicit choice, nothing lost to a bad write.

Why a module of its own: the CLI commands and the ComfyUI Train node write the same files (a resumable
`checkpoint.pt` and the exported ControlNet), and a user's hours of training, or a downloaded model that happens to
share a name, must survive every path through them:
  * starting over in a folder that holds a run needs `--resume` (continue) or `--overwrite` (replace it);
  * each checkpoint is written beside the old one and renamed over it, and the previous good one is kept as
    `checkpoint.prev.pt`, so a crash, a full disk or a damaged file never leaves the run without a good checkpoint;
  * a damaged checkpoint is reported with its file name and how to go on; it never silently restarts from zero;
  * a checkpoint remembers the dataset it was trained on, and resuming on another one is refused.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..checkpoint import refused_pickle_global
from ..errors import ControlNetError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
REQUIRED_KEYS = ("controlnet", "optimizer", "step", "epoch", "position", "gen", "prompt_rng", "prompt_rng_gauss", "config")


class RunExistsError(ControlNetError):
    """Starting a run would replace an earlier run's files (or a model of the same name) without being asked to."""


class DamagedCheckpointError(ControlNetError):
    """A training checkpoint that cannot be read back (truncated, empty, random bytes, foreign content)."""


class DatasetChangedError(ControlNetError):
    """Resuming a run on a dataset other than the one its checkpoint was trained on."""


def previous_of(path: Path) -> Path:
    return Path(path).with_name(PREVIOUS if Path(path).name == CHECKPOINT else Path(path).stem + ".prev" + Path(path).suffix)


def existing_run_files(folder: Path, extra: Iterable[str] = ()) -> list[str]:
    folder = Path(folder)
    return [name for name in (CHECKPOINT, PREVIOUS, *extra) if (folder / name).exists()]


def check_can_start(folder: Path, *, resume: bool, overwrite: bool, outputs: Iterable[str] = ("controlnet.safetensors",),
                    resume_hint: str = "--resume", overwrite_hint: str = "--overwrite", other_hint: str = "another --out") -> None:
    """Refuse to start over where a run already is, unless the caller asked to resume it or to replace it."""
    if overwrite:
        return
    found = existing_run_files(folder, outputs)
    if resume and resumable(folder):
        return  # resuming: a damaged or missing newest checkpoint is reported when it is loaded
    if found:
        step = checkpoint_step(Path(folder) / CHECKPOINT)
        at = f", at step {step}" if step is not None else ""
        raise RunExistsError(
            f"{folder} already holds a training run ({', '.join(found)}{at}); starting over would replace it. "
            f"Use {resume_hint} to continue it, {overwrite_hint} to replace it, or choose {other_hint}.")


def resumable(folder: Path) -> bool:
    """Whether a resume has a checkpoint to start from (the newest, or the previous one if only that is left)."""
    return bool({CHECKPOINT, PREVIOUS} & set(existing_run_files(folder)))


def checkpoint_step(path: Path) -> Optional[int]:
    """The step a readable checkpoint was saved at, else None (missing or damaged). Memory-mapped: only for a
    message, so an SDXL run's gigabytes of weights and optimizer state are never read for it."""
    try:
        return int(read_checkpoint(path, mmap=True)["step"])
    except (ControlNetError, OSError):
        return None


def save_checkpoint(state: dict, path: Path) -> None:
    """Written to `.part` and renamed into place; the checkpoint it replaces becomes `checkpoint.prev.pt`. At every
    moment `path` holds a complete checkpoint (the old one, then the new one), so a kill anywhere loses nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        torch.save(state, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if path.exists():  # the current one becomes the previous one, while `path` itself never goes missing
        keep = previous_of(path).with_name(previous_of(path).name + ".part")
        keep.unlink(missing_ok=True)
        try:
            os.link(path, keep)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, keep)
        os.replace(keep, previous_of(path))
    os.replace(tmp, path)


def _reason(error: BaseException) -> str:
    """What went wrong, in one line, without torch's advice to turn the weights-only protection off (never follow it
    for a file you did not write) and without terminal colour codes."""
    refused = refused_pickle_global(error)
    if refused is not None or "UnpicklingError" in type(error).__name__:
        named = f" ({refused})" if refused and refused.startswith("'") else ""
        return f"it holds pickled objects other than tensors and plain data{named}, which are never loaded"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """torch.load with weights_only, every failure as DamagedCheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpointError(f"{path}: no such checkpoint file.")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"{path} is damaged: the file is empty (0 bytes).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - zip, pickle, EOF and OS errors alike mean the file cannot be used
        raise DamagedCheckpointError(f"{path} is damaged: {_reason(e)}.") from None
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise DamagedCheckpointError(f"{path} is not a training checkpoint of this library: it lacks {', '.join(missing)}.")
    return state


def load_checkpoint(path: Path, *, fresh_hint: str = "start fresh with --overwrite (or another --out)") -> dict:
    """The checkpoint's state; when it is damaged, the error says which earlier checkpoint is good and how to use it."""
    path = Path(path)
    try:
        return read_checkpoint(path)
    except DamagedCheckpointError as e:
        previous = previous_of(path)
        step = checkpoint_step(previous)
        if step is not None:
            how = (f"The previous good checkpoint is {previous} (step {step}): rename it to {path.name} to resume from "
                   f"there, or {fresh_hint}.")
        else:
            how = f"No earlier good checkpoint is kept beside it; {fresh_hint}."
        raise DamagedCheckpointError(f"{e} {how}") from None


def dataset_fingerprint(samples: Iterable) -> dict:
    """What identifies a dataset: its pairs' file names (relative to their folder), sizes and prompts. Stable across
    copies and machines (no absolute paths, no times); a changed image, prompt or pair count changes it."""
    h = hashlib.sha256()
    n = 0
    for s in samples:
        n += 1
        for p in (s.condition, s.target):
            p = Path(p)
            size = p.stat().st_size if p.exists() else -1  # derived conditions (annotator) have no file
            h.update(f"{p.parent.name}/{p.name}:{size}\n".encode())
        h.update(s.prompt.encode("utf-8", "replace") + b"\n")
    return {"pairs": n, "sha256": h.hexdigest()}


def check_same_dataset(path: Path, saved: Optional[dict], current: dict, folder: Optional[Path] = None) -> None:
    """Refuse to resume on another dataset than the checkpoint's (checkpoints from before fingerprints pass)."""
    if not saved or saved == current:
        return
    where = f" ({folder})" if folder else ""
    raise DatasetChangedError(
        f"{path} was trained on another dataset ({saved.get('pairs')} pairs, fingerprint {str(saved.get('sha256'))[:12]}) "
        f"than the one given now{where} ({current['pairs']} pairs, fingerprint {current['sha256'][:12]}): resuming would mix "
        "two runs. Resume with the original dataset, or start a new run (another output name) on this one.")


__all__ = ["CHECKPOINT", "PREVIOUS", "RunExistsError", "DamagedCheckpointError", "DatasetChangedError", "check_can_start",
           "save_checkpoint", "read_checkpoint", "resumable", "load_checkpoint", "checkpoint_step", "dataset_fingerprint", "check_same_dataset",
           "previous_of", "existing_run_files"]
