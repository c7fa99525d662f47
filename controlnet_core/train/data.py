"""Training data: (condition image, target image, prompt) triples.

Two layouts:
- fill50k: `prompt.json` with one JSON object per line, {"source": cond path, "target": image path,
  "prompt": text}, paths relative to the folder (the paper's toy dataset format);
- plain folders: `conditions/NAME.png`, `images/NAME.png`, `captions/NAME.txt` (a missing caption = "").
Bad data is reported with the file and what to do, at construction (paths) or at read (pixels).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ControlNetError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ControlNetError):
    """A training folder that cannot be used as it is."""


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


def scan(root: Path) -> list[Sample]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder.")
    pj = root / "prompt.json"
    if pj.is_file():
        samples = []
        for n, line in enumerate(pj.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                samples.append(Sample(root / d["source"], root / d["target"], str(d.get("prompt", ""))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{pj}, line {n}: expected {{\"source\": ..., \"target\": ..., \"prompt\": ...}} ({e}).") from None
        if not samples:
            raise DatasetError(f"{pj}: the prompt file is empty; it needs one JSON line per training pair.")
    elif (root / "images").is_dir() and (root / "conditions").is_dir():
        samples = []
        for img in sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTS):
            conds = [root / "conditions" / (img.stem + e) for e in IMAGE_EXTS if (root / "conditions" / (img.stem + e)).is_file()]
            if not conds:
                raise DatasetError(f"{img}: no condition image conditions/{img.stem}.* for it.")
            cap = root / "captions" / (img.stem + ".txt")
            samples.append(Sample(conds[0], img, cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""))
        if not samples:
            raise DatasetError(f"{root}/images: no images ({', '.join(IMAGE_EXTS)}).")
    else:
        raise DatasetError(f"{root}: expected prompt.json (fill50k layout) or images/ + conditions/ (+ captions/) folders.")
    missing = [str(p) for s in samples for p in (s.condition, s.target) if not p.is_file()]
    if missing:
        raise DatasetError(f"{root}: {len(missing)} listed image files do not exist, e.g. {missing[:3]}.")
    return samples


class ControlDataset(torch.utils.data.Dataset):
    """Items: {"hint": (3,H,W) in [0,1], "target": (3,H,W) in [-1,1], "prompt": str} (the paper's value ranges)."""

    def __init__(self, root: Path, size: Optional[int] = None):
        self.samples = scan(root)
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        import cv2

        s = self.samples[i]
        cond, target = _read_image(s.condition), _read_image(s.target)
        if cond.shape != target.shape:
            raise DatasetError(f"{s.condition} is {cond.shape[1]}x{cond.shape[0]} but {s.target} is {target.shape[1]}x{target.shape[0]}; "
                               "a condition must have its image's size.")
        if self.size:
            cond = cv2.resize(cond, (self.size, self.size), interpolation=cv2.INTER_AREA)
            target = cv2.resize(target, (self.size, self.size), interpolation=cv2.INTER_AREA)
        hint = torch.from_numpy(cond).permute(2, 0, 1).float() / 255.0
        tgt = torch.from_numpy(target).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"hint": hint, "target": tgt, "prompt": s.prompt}


def drop_prompts(prompts: Sequence[str], rate: float, rng: random.Random) -> list[str]:
    """The paper's trick: replace a fraction `rate` (default 0.5) of prompts with "" so the ControlNet learns
    to read semantics from the condition alone (section 3.3)."""
    return ["" if rng.random() < rate else p for p in prompts]
