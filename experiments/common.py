"""What every toy-world experiment shares: paths, the run's settings, threads, and the fixed evaluation set.

Why one place: the demo, the retraining and the tests must sample and score exactly the same way, and a
reduced (`quick`) run for the tests must differ from the real one only in sizes, never in code path.
"""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python experiments/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from controlnet_core.train.toy_world import draw_pair, prompt_for, random_circle  # noqa: E402

DEMO = ROOT / "demo"
BASE_FILE = DEMO / "toy_base.safetensors"
CONTROLNET_FILE = DEMO / "toy_controlnet.safetensors"
RESULTS = ROOT / "experiments" / "results"  # JSON numbers, committed
PLOTS = ROOT / "experiments" / "plots"  # PNGs, committed
WORK = ROOT / "experiments" / "work"  # dataset, checkpoints: not committed

EVAL_SEED = 12345  # the evaluation conditions are drawn from their own seed, never from the training set's


@dataclass(frozen=True)
class Settings:
    """One retraining run. The defaults are the shipped models' (30-40 minutes on 2 CPU cores, estimated)."""

    data_size: int = 4000  # training pairs
    data_seed: int = 0
    base_steps: int = 1600
    base_lr: float = 1e-3  # the toy base trains from scratch: a usual from-scratch rate for a small UNet
    base_batch: int = 16
    base_empty_prompt_rate: float = 0.1  # so that classifier-free guidance has an unconditional model
    base_ema: float = 0.995
    cn_steps: int = 1200
    cn_lr: float = 2e-3  # the paper's 1e-5 is for SD; on this toy 1e-3 starts to follow the condition only after ~1000 steps
    cn_batch: int = 8
    ablation_steps: int = 1200  # the ablation runs (as long as the shipped one: compared at equal steps)
    eval_every: int = 100
    eval_n: int = 32  # conditions in the evaluation set
    curve_ddim_steps: int = 10  # sampling steps for the IoU-vs-steps curves
    ddim_steps: int = 20  # sampling steps for the final scores and the demo
    cfg: float = 3.0
    prediction: str = "v"
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


QUICK = replace(Settings(), data_size=64, base_steps=4, base_batch=4, cn_steps=4, cn_batch=2, ablation_steps=2,
                eval_every=2, eval_n=4, curve_ddim_steps=2, ddim_steps=3)


def set_threads() -> int:
    """CNS_THREADS if set; otherwise the cores torch sees minus the current load (1-minute average), at least 1.

    Why: PyTorch's OpenMP threads spin-wait for each other; when another process holds one of the cores, two threads
    can make a step ten times slower than one (measured on a shared 2-core machine)."""
    n = int(os.environ.get("CNS_THREADS", "0"))
    if not n:
        cores = torch.get_num_threads()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        n = max(1, cores - round(load))
    torch.set_num_threads(n)
    return n


def eval_set(n: int, size: int = 128) -> tuple[torch.Tensor, list[str]]:
    """`n` conditions (B,3,H,W) in [0,1] and their prompts, drawn from EVAL_SEED."""
    rng = random.Random(EVAL_SEED)
    hints, prompts = [], []
    for _ in range(n):
        c, r, fg, bg = random_circle(rng, size)
        cond, _ = draw_pair(c, r, fg, bg, size)
        hints.append(torch.from_numpy(cond).permute(2, 0, 1).float() / 255.0)
        prompts.append(prompt_for(fg, bg))
    return torch.stack(hints), prompts


def write_json(path: Path, data) -> Path:
    """Atomically (temp file + rename), so an interrupted run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())
