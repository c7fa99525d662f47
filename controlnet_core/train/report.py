"""Training report: a loss-curve PNG and a validation-grid PNG (conditions next to samples) in the run folder.

Why: a ControlNet's loss barely moves while it learns (the paper's "sudden convergence" shows in samples,
not in the loss), so a run needs pictures: the loss curve catches divergence, the grid shows when the
samples start to follow the conditions. matplotlib with the Agg backend (no display needed); the loss
history is kept in `losses.json`, so a resumed run continues the same curve.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import ControlNetError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
SampleFn = Callable[[torch.Tensor, list], torch.Tensor]


class ReportUnavailable(ControlNetError):
    """matplotlib is not installed (it is optional: ComfyUI does not ship it)."""


def _figure(**kw):
    """A figure on the Agg canvas, outside pyplot: no display, and no global backend switch in the host."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportUnavailable("the loss curve and validation grid PNGs need matplotlib: pip install matplotlib") from None

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _atomic_savefig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)  # the suffix tells matplotlib the format
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential smoothing with bias correction (the first points are not pulled towards 0)."""
    out, s = [], 0.0
    for i, v in enumerate(values, 1):
        s = weight * s + (1 - weight) * v
        out.append(s / (1 - weight**i))
    return out


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: PathLike, title: str = "training loss") -> Path:
    """Raw per-step losses (light) and their smoothed curve; log y-axis when the losses span a decade."""
    fig = _figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    if len(losses) > 1:
        ax.plot(steps, smooth(losses), color="tab:blue", linewidth=1.8, label="smoothed")
    pos = [v for v in losses if v > 0]
    if pos and max(pos) / min(pos) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return _atomic_savefig(fig, Path(path))


def _hwc(img: torch.Tensor):
    x = img.detach().float().cpu().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3].permute(1, 2, 0).numpy()


def save_validation_grid(conditions: torch.Tensor, samples: Sequence[torch.Tensor], path: PathLike, *,
                         prompts: Optional[Sequence[str]] = None, column_titles: Optional[Sequence[str]] = None,
                         title: str = "") -> Path:
    """One row per condition: the condition, then each sample set's image for it.

    conditions (B, C, H, W) in [0, 1]; samples: one or more (B, 3, H, W) batches in [0, 1] (for example
    with and without the ControlNet, or several seeds).
    """
    rows, cols = conditions.shape[0], 1 + len(samples)
    for s in samples:
        if s.shape[0] != rows:
            raise ValueError(f"validation grid: {rows} conditions but a sample batch of {s.shape[0]}; give one sample per condition.")
    titles = ["condition"] + list(column_titles or [f"sample {i + 1}" for i in range(len(samples))])
    fig = _figure(figsize=(2.4 * cols, 2.4 * rows + (0.4 if title else 0)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(_hwc(conditions[r] if c == 0 else samples[c - 1][r]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        if prompts is not None:
            axes[r][0].set_ylabel(prompts[r][:40] or '""', fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _atomic_savefig(fig, Path(path))


class TrainingReport:
    """An `on_step` callback for `Trainer.train` that keeps the loss history and draws the PNGs.

    out_dir: the run folder (loss.png, losses.json, validation.png, validation_step_N.png).
    every: redraw the loss curve every this many steps (and at `finish`).
    sample_fn(hints, prompts) -> images in [0, 1]: draws the validation grid every `validate_every` steps
    (0: only at `finish`); None: no grid. Build one with `sampling.make_sample_fn`, or pass your own.
    validation: {"hint": (B,3,H,W) in [0,1], "prompt": [...]}, the fixed conditions of the grid.
    rank: under torchrun every rank calls the callback (a sharded model samples collectively); rank 0 writes.
    """

    def __init__(self, out_dir: PathLike, *, every: int = 50, sample_fn: Optional[SampleFn] = None,
                 validation: Optional[dict] = None, validate_every: int = 0, rank: int = 0, keep_history: bool = True):
        self.out = Path(out_dir)
        self.every, self.validate_every = every, validate_every
        self.sample_fn, self.validation, self.rank = sample_fn, validation, rank
        if sample_fn is not None and not validation:
            raise ValueError("TrainingReport: a sample_fn needs validation conditions ({'hint': ..., 'prompt': [...]}).")
        self.history: dict[int, float] = {}
        hist = self.out / "losses.json"
        if keep_history and hist.is_file():
            self.history = {int(k): float(v) for k, v in json.loads(hist.read_text()).items()}

    def __call__(self, step: int, loss: float) -> None:
        # a resumed run restarts after its checkpoint: drop what a killed run logged past it
        self.history = {s: v for s, v in self.history.items() if s < step}
        self.history[step] = loss
        if self.every and step % self.every == 0:
            self.write_curve()
        if self.validate_every and step % self.validate_every == 0:
            self.write_grid(step)

    def write_curve(self) -> Optional[Path]:
        if self.rank != 0 or not self.history:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "losses.json.part"
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self.history.items())}))
        os.replace(tmp, self.out / "losses.json")
        steps = sorted(self.history)
        try:
            return save_loss_curve(steps, [self.history[s] for s in steps], self.out / "loss.png")
        except ReportUnavailable as e:
            self._warn_once(e)
            return None

    def _warn_once(self, e: Exception) -> None:
        if not getattr(self, "_warned", False):
            log.warning("%s; writing %s only", e, self.out / "losses.json")
            self._warned = True

    def write_grid(self, step: int) -> Optional[Path]:
        if self.sample_fn is None:
            return None
        v = self.validation
        images = self.sample_fn(v["hint"], list(v["prompt"]))  # every rank: the model may be sharded
        if self.rank != 0:
            return None
        try:
            path = save_validation_grid(v["hint"], [images], self.out / f"validation_step_{step}.png", prompts=v["prompt"],
                                        column_titles=[f"step {step}"], title=f"validation at step {step}")
        except ReportUnavailable as e:
            self._warn_once(e)
            return None
        tmp = self.out / "validation.part.png"  # the latest grid, under a fixed name
        tmp.write_bytes(path.read_bytes())
        os.replace(tmp, self.out / "validation.png")
        return path

    def finish(self, step: int) -> None:
        self.write_curve()
        if self.sample_fn is not None and not (self.validate_every and step % self.validate_every == 0):
            self.write_grid(step)


__all__ = ["ReportUnavailable", "TrainingReport", "save_loss_curve", "save_validation_grid", "smooth"]
