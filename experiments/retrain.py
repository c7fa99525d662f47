"""`make toy-retrain`: retrain the toy base and toy ControlNet from scratch, rerun every experiment, redraw the plots.

    python experiments/retrain.py [--quick] [--fresh] [--skip-cost]

Stages, in order: dataset -> base model (demo/toy_base.safetensors) -> step-0 identity -> ControlNet with the paper's
settings (demo/toy_controlnet.safetensors) and its IoU curve -> the two ablation runs -> the base model alone,
scored -> training cost -> plots (experiments/plots) -> a demo image. Seeded throughout. An interrupted run
(Ctrl-C, a kill) continues where its checkpoints are when started again; once a run has completed, the next one
starts from scratch (the dataset, which depends only on its seed, is kept). `--fresh` always starts from scratch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import torch
from common import BASE_FILE, CONTROLNET_FILE, PLOTS, QUICK, RESULTS, WORK, Settings, set_threads, write_json
from plots import draw_all
from step0_identity import step0
from train_base import train_base
from train_controlnet import evaluate, train_controlnet

from controlnet_core.train.toy_sample import load_toy_base
from demo import run_demo


def start(work: Path, fresh: bool) -> None:
    """Remove the previous run's checkpoints when it completed (or when asked); keep an interrupted one."""
    done = work / "complete.json"
    if fresh or done.is_file():
        for d in [work / "base", *work.glob("cn_*")]:
            shutil.rmtree(d, ignore_errors=True)
        done.unlink(missing_ok=True)


def score_base(s: Settings, base: Path, results: Path) -> dict:
    unet = load_toy_base(base)
    with_p, _ = evaluate(unet, None, s, s.ddim_steps, True)
    without_p, _ = evaluate(unet, None, s, s.ddim_steps, False)
    r = {"iou_with_prompts": round(with_p, 4), "iou_without_prompts": round(without_p, 4)}
    write_json(results / "base_alone.json", r)
    print(f"base alone: IoU with prompts {with_p:.3f}, without {without_p:.3f}", flush=True)
    return r


def retrain(s: Settings, work: Path, results: Path, plots: Path, base: Path, controlnet: Path, fresh: bool = False,
            cost: bool = True, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    start(work, fresh)
    stages: dict[str, float] = {}

    def stage(name: str, fn, *args, **kw):
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        out = fn(*args, **kw)
        stages[name] = round(time.perf_counter() - t, 1)
        return out

    stage("base model", train_base, s, work, base, results)
    stage("step-0 identity", step0, s, base, results)
    stage("ControlNet (paper settings)", train_controlnet, s, "zero50", s.cn_steps, base, work, results, controlnet)
    stage("ablation: ordinary convs", train_controlnet, s, "random50", s.ablation_steps, base, work, results)
    stage("ablation: no empty prompts", train_controlnet, s, "zero0", s.ablation_steps, base, work, results)
    stage("base model alone, scored", score_base, s, base, results)
    if cost:
        import subprocess
        import sys

        cmd = [sys.executable, str(Path(__file__).with_name("training_cost.py")), "--results", str(results)] + (
            ["--quick", "--repeats", "1", "--steps", "1"] if quick else [])
        env = {**os.environ, "CNS_THREADS": str(torch.get_num_threads())}
        stage("training cost", subprocess.run, cmd, check=True, env=env)
    stage("plots", draw_all, results, plots)
    stage("demo image", run_demo, 8, s.ddim_steps, plots / "demo.png", base, controlnet, s)
    total = round(time.perf_counter() - t0, 1)
    record = {"seconds": total, "stages_seconds": stages, "threads": torch.get_num_threads(), "settings": s.to_json()}
    write_json(results / "retrain_time.json", record)
    write_json(work / "complete.json", record)
    print(json.dumps(stages, indent=1))
    print(f"retrain: {total / 60:.1f} min", flush=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--fresh", action="store_true", help="start from scratch even if an interrupted run could continue")
    ap.add_argument("--skip-cost", action="store_true", help="leave out the training-cost measurement")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plots", type=Path, default=PLOTS)
    ap.add_argument("--base", type=Path, default=BASE_FILE)
    ap.add_argument("--controlnet", type=Path, default=CONTROLNET_FILE)
    a = ap.parse_args()
    set_threads()
    retrain(QUICK if a.quick else Settings(), a.work, a.results, a.plots, a.base, a.controlnet, a.fresh, not a.skip_cost, a.quick)


if __name__ == "__main__":
    main()
