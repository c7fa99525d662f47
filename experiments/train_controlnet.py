"""Train a toy ControlNet on the shipped toy base with the project's Trainer, scoring controllability as it learns.

    python experiments/train_controlnet.py VARIANT [--quick]

Variants (the paper's ablation, section 4.3, and its empty-prompt rate, section 3.3):
- zero50: the paper's settings: locked base, zero-initialised layers, 50% of prompts replaced with "" (shipped);
- random50: the layers that `create_from_unet` zeroes (the zero convs, `middle_block_out` and the hint encoder's
  last conv, the paper's Z(.; theta_z1)) re-initialised as ordinary convs (PyTorch's default init), 50% empty;
- zero0: zero-initialised, no prompt ever replaced.
Every `eval_every` steps the fixed evaluation set is sampled (DDIM, `curve_ddim_steps`) and its mean IoU recorded;
at the end IoU is measured with the prompts and with empty prompts (DDIM, `ddim_steps`). Resumable like the base.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import torch
from common import BASE_FILE, QUICK, RESULTS, WORK, Settings, eval_set, set_threads, write_json
from train_base import ensure_data, progress

from controlnet_core import create_from_unet, save_ldm
from controlnet_core.model import ControlNet
from controlnet_core.train import ControlDataset, TrainConfig, Trainer
from controlnet_core.train.toy_sample import load_toy_base, score
from controlnet_core.train.toy_world import ToyPromptEncoder, encode_image

VARIANTS = {"zero50": (True, 0.5), "random50": (False, 0.5), "zero0": (True, 0.0)}  # zero init, empty-prompt rate


def zeroed_layers(cn: ControlNet) -> list[torch.nn.Conv2d]:
    """The convs `create_from_unet` sets to zero."""
    return [m[0] for m in cn.zero_convs] + [cn.middle_block_out[0], cn.input_hint_block[-1]]


def randomize_zero_layers(cn: ControlNet, seed: int) -> ControlNet:
    """The ablation: ordinary convs where the paper puts zero convs (nn.Conv2d's own init, seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for conv in zeroed_layers(cn):
            conv.reset_parameters()
    return cn


def evaluate(unet, cn, s: Settings, steps: int, with_prompts: bool = True) -> tuple[float, list[float]]:
    hints, prompts = eval_set(s.eval_n)
    was = cn.training if cn is not None else False
    if cn is not None:
        cn.eval()
    try:
        _, iou = score(unet, cn, hints, prompts if with_prompts else [""] * len(prompts), steps=steps, cfg=s.cfg,
                       prediction=s.prediction, seed=s.seed)
    finally:
        if cn is not None:
            cn.train(was)
    return float(iou.mean()), [round(float(v), 4) for v in iou]


def train_controlnet(s: Settings, variant: str, steps: int, base: Path = BASE_FILE, work: Path = WORK, results: Path = RESULTS,
                     out: Path | None = None) -> dict:
    zero, rate = VARIANTS[variant]
    unet = load_toy_base(base)
    cn = create_from_unet(unet.state_dict(), seed=s.seed)
    if not zero:
        randomize_zero_layers(cn, s.seed)
    cfg = TrainConfig(lr=s.cn_lr, batch_size=s.cn_batch, empty_prompt_rate=rate, prediction=s.prediction, seed=s.seed)
    trainer = Trainer(unet, cn, ToyPromptEncoder(), encode_image, ControlDataset(ensure_data(s, work)), cfg)
    run = work / f"cn_{variant}"
    ckpt, curve_file = run / "checkpoint.pt", run / "curve.json"
    record = {"curve": [], "losses": []}
    if ckpt.is_file():
        trainer.load_checkpoint(ckpt)
        if curve_file.is_file():
            saved = common.read_json(curve_file)
            record = {"curve": [p for p in saved["curve"] if p[0] <= trainer.step], "losses": saved["losses"][: trainer.step]}
        print(f"{variant}: resumed at step {trainer.step}", flush=True)
    report = progress(variant, steps)

    def point() -> None:
        mean, _ = evaluate(unet, cn, s, s.curve_ddim_steps)
        record["curve"].append([trainer.step, round(mean, 4)])
        write_json(curve_file, record)
        print(f"{variant} step {trainer.step}: IoU {mean:.3f}", flush=True)

    if not record["curve"]:
        point()

    def on_step(step: int, loss: float) -> None:
        record["losses"].append(loss)
        report(step, loss)
        if step % s.eval_every == 0:
            point()

    t0 = time.perf_counter()
    trainer.train(max(0, steps - trainer.step), checkpoint=ckpt, save_every=s.eval_every, on_step=on_step)
    seconds = time.perf_counter() - t0
    with_p, per_item = evaluate(unet, cn, s, s.ddim_steps, True)
    without_p, _ = evaluate(unet, cn, s, s.ddim_steps, False)
    # the run folder is always resumed and its files refreshed; --out names a file to write (replaced if it exists)
    save_ldm(cn, run / "controlnet.safetensors", dtype=torch.float16, overwrite=True)
    if out is not None:
        save_ldm(cn, out, dtype=torch.float16, overwrite=True)
    result = {"variant": variant, "zero_init": zero, "empty_prompt_rate": rate, "steps": trainer.step, "settings": s.to_json(),
              "curve": record["curve"], "losses": record["losses"], "iou_with_prompts": round(with_p, 4),
              "iou_without_prompts": round(without_p, 4), "iou_per_item_with_prompts": per_item,
              "seconds_this_run": round(seconds, 1)}
    write_json(results / f"controlnet_{variant}.json", result)
    print(f"{variant}: IoU with prompts {with_p:.3f}, without {without_p:.3f}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=sorted(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--steps", type=int, help="default: cn_steps for zero50, ablation_steps for the others")
    ap.add_argument("--base", type=Path, default=BASE_FILE)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, help="also write the ControlNet here (v1.1 layout, fp16; an existing file is replaced)")
    a = ap.parse_args()
    set_threads()
    s = QUICK if a.quick else Settings()
    steps = a.steps or (s.cn_steps if a.variant == "zero50" else s.ablation_steps)
    train_controlnet(s, a.variant, steps, a.base, a.work, a.results, a.out)


if __name__ == "__main__":
    main()
