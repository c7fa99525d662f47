"""Training data: (condition image, target image, prompt) triples.

Two layouts:
- fill50k: `prompt.json` with one JSON object per line, {"source": cond path, "target": image path,
  "prompt": text}, paths relative to the folder (the paper's toy dataset format);
- plain folders: `conditions/NAME.png`, `images/NAME.png`, `captions/NAME.txt` (a missing caption = "").
With a `condition_fn` (an annotator, see conditions.py) conditions are derived from the images, and `images/`
(+ `captions/`) is enough. Sizes: as stored, a square `size`, or aspect-ratio `buckets` (see buckets.py).
Bad data is reported before training: the constructor opens every file and raises one `DatasetError` naming every
missing or unreadable file, every size mismatch and every bad prompt line (see dataset_check.py), and
`check_batches` refuses mixed sizes and batches above the memory limits.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .buckets import Buckets, assign, epoch_order, fit
from .cache import file_key
from .dataset_check import DatasetError, check_batches, check_files, dataset_error, not_a_file

# images (B, 3, H, W) in [0, 1] -> conditions (B, C, H, W) in [0, 1], computed while loading; the annotators package
# builds them (annotators/training.py) without this package knowing it
ConditionFn = Callable[[torch.Tensor], torch.Tensor]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Sample:
    condition: Path
    target: Path
    prompt: str


def _read_image(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: not a readable image (corrupt, or not an image). Remove or replace it.")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def scan(root: Path, derive_conditions: bool = False) -> list[Sample]:
    """The samples of a dataset folder. derive_conditions: conditions are computed from the images (an
    annotator), so `images/` (+ `captions/`) is enough; each sample's condition path is then its image.
    Every bad prompt line, unreadable caption and missing file is named in one `DatasetError`."""
    samples, problems = _collect(Path(root), derive_conditions)
    listed = dict.fromkeys(p for s in samples for p in (s.condition, s.target))
    problems += [(p, what) for p in listed if (what := not_a_file(p))]
    if problems:
        raise dataset_error(root, problems)
    return samples


def _collect(root: Path, derive_conditions: bool) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """The samples, and every (file, what is wrong) found in the prompt file and captions."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder.")
    pj = root / "prompt.json"
    if pj.is_file():
        samples, problems = _fill50k(root, pj)
    elif (root / "images").is_dir() and ((root / "conditions").is_dir() or derive_conditions):
        samples, problems = _folders(root, derive_conditions)
    else:
        raise DatasetError(f"{root}: expected prompt.json (fill50k layout) or images/ + conditions/ (+ captions/) folders "
                           "(images/ alone is enough when an annotator derives the conditions).")
    return samples, problems


def _fill50k(root: Path, pj: Path) -> tuple[list[Sample], list[tuple[Path, str]]]:
    try:
        lines = pj.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{pj}: the prompt file cannot be read ({e}); it must be UTF-8 text, one JSON line per pair.") from None
    samples, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            samples.append(Sample(root / d["source"], root / d["target"], str(d.get("prompt", ""))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append((pj, f"line {n}: expected {{\"source\": ..., \"target\": ..., \"prompt\": ...}} ({e})"))
    if not samples and not problems:
        raise DatasetError(f"{pj}: the prompt file is empty; it needs one JSON line per training pair.")
    return samples, problems


def _folders(root: Path, derive_conditions: bool) -> tuple[list[Sample], list[tuple[Path, str]]]:
    samples, problems = [], []
    for img in sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTS):
        conds = [img] if derive_conditions else [root / "conditions" / (img.stem + e) for e in IMAGE_EXTS if (root / "conditions" / (img.stem + e)).is_file()]
        if not conds:
            problems.append((img, f"no condition image conditions/{img.stem}.* for it"))
            continue
        cap = root / "captions" / (img.stem + ".txt")
        try:
            prompt = cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""
        except (OSError, UnicodeDecodeError) as e:
            problems.append((cap, f"caption not readable as UTF-8 text ({e})"))
            continue
        samples.append(Sample(conds[0], img, prompt))
    if not samples and not problems:
        raise DatasetError(f"{root}/images: no images ({', '.join(IMAGE_EXTS)}).")
    return samples, problems


class ControlDataset(torch.utils.data.Dataset):
    """Items: {"hint": (3,H,W) in [0,1], "target": (3,H,W) in [-1,1], "prompt": str} (the paper's value ranges)."""

    def __init__(self, root: Path, size: Optional[int] = None, *, buckets: Optional[Buckets] = None,
                 condition_fn: Optional[ConditionFn] = None):
        """size: resize every pair to size x size. buckets: aspect-ratio bucketing instead (see buckets.py);
        batches then come from one bucket each, in `epoch_order`. condition_fn: derive each condition from its
        (resized) target image, e.g. `conditions.annotator_condition("canny")`; condition files are then unused."""
        if size and buckets:
            raise DatasetError("ControlDataset: give either size (square resize) or buckets (aspect-ratio buckets), not both.")
        self.root = Path(root)
        # every file is opened here (headers), and every problem named in one error: nothing bad waits for step N
        self.samples, problems = _collect(self.root, condition_fn is not None)
        self.stored_sizes, more = check_files(self.root, self.samples, derive_conditions=condition_fn is not None)
        if problems or more:
            raise dataset_error(self.root, problems + more)
        self.size = size
        self.buckets = buckets
        self.condition_fn = condition_fn
        self.bucket_of = assign(self.stored_sizes, buckets) if buckets else None

    def __len__(self) -> int:
        return len(self.samples)

    def training_sizes(self) -> list[tuple[int, int]]:
        """Each sample's (height, width) as training sees it: its bucket, the square size, or as stored."""
        if self.bucket_of:
            return list(self.bucket_of)
        return [(self.size, self.size)] * len(self) if self.size else list(self.stored_sizes)

    def check_batches(self, batch_size: int) -> None:
        """Refuse mixed stored sizes (a batch must share one) and batches above the memory limits, before step 1."""
        how = "buckets" if self.bucket_of else "size" if self.size else "stored"
        check_batches(self.root, self.training_sizes(), batch_size, [s.target for s in self.samples], how)

    def epoch_order(self, epoch: int, seed: int, global_batch: int) -> Optional[torch.Tensor]:
        """The bucketed sample order of an epoch (each global batch from one bucket); None without buckets."""
        return epoch_order(self.bucket_of, epoch, seed, global_batch) if self.bucket_of else None

    def __getitem__(self, i: int) -> dict:
        import cv2

        s = self.samples[i]
        target = _read_image(s.target)
        cond = None if self.condition_fn else _read_image(s.condition)
        if cond is not None and cond.shape != target.shape:
            raise DatasetError(f"{s.condition} is {cond.shape[1]}x{cond.shape[0]} but {s.target} is {target.shape[1]}x{target.shape[0]}; "
                               "a condition must have its image's size.")
        resize = "stored"
        if self.bucket_of:
            bh, bw = self.bucket_of[i]
            target, cond = fit(target, bh, bw), None if cond is None else fit(cond, bh, bw)
            resize = "bucket"
        elif self.size:
            cond = None if cond is None else cv2.resize(cond, (self.size, self.size), interpolation=cv2.INTER_AREA)
            target = cv2.resize(target, (self.size, self.size), interpolation=cv2.INTER_AREA)
            resize = "stretch"
        tgt = torch.from_numpy(target).permute(2, 0, 1).float() / 127.5 - 1.0
        if self.condition_fn:
            hint = self._derive(torch.from_numpy(target).permute(2, 0, 1).float()[None] / 255.0, s.target)
        else:
            hint = torch.from_numpy(cond).permute(2, 0, 1).float() / 255.0
        # identifies the target tensor for the latent cache: file, its version, and how it was resized
        key = f"{file_key(s.target, tgt.shape[-2:])}|{resize}"
        return {"hint": hint, "target": tgt, "prompt": s.prompt, "key": key}

    def _derive(self, image01: torch.Tensor, source: Path) -> torch.Tensor:
        out = self.condition_fn(image01)
        if out.ndim != 4 or out.shape[0] != 1 or out.shape[-2:] != image01.shape[-2:]:
            raise DatasetError(f"{source}: the condition function returned shape {tuple(out.shape)}; expected (1, C, "
                               f"{image01.shape[-2]}, {image01.shape[-1]}), a condition at the image's size.")
        out = out[0].float()
        return out.expand(3, -1, -1).contiguous() if out.shape[0] == 1 else out


def drop_prompts(prompts: Sequence[str], rate: float, rng: random.Random) -> list[str]:
    """The paper's trick: replace a fraction `rate` (default 0.5) of prompts with "" so the ControlNet learns
    to read semantics from the condition alone (section 3.3)."""
    return ["" if rng.random() < rate else p for p in prompts]
