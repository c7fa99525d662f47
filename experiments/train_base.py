"""Train the toy world's base diffusion model with the project's own Trainer (base mode: controlnet=None).

    python experiments/train_base.py [--quick] [--out demo/toy_base.safetensors]

Resumable: a checkpoint is written every 200 steps under experiments/work/; running again continues it
(bit for bit, see the Trainer). The exported weights are the EMA of the UNet, stored in fp16.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import torch
from common import BASE_FILE, QUICK, RESULTS, WORK, Settings, set_threads, write_json

from controlnet_core.train import ControlDataset, TrainConfig, Trainer
from controlnet_core.train.toy_sample import save_toy_base
from controlnet_core.train.toy_world import TOY_BASE_UNET, ToyPromptEncoder, encode_image, make_toy_world
from controlnet_core.unet import UNetModel


def ensure_data(s: Settings, work: Path) -> Path:
    """The training set for these settings (made once; prompt.json is written last, so its presence means complete)."""
    root = work / f"data_{s.data_size}_{s.data_seed}"
    if not (root / "prompt.json").is_file():
        make_toy_world(root, s.data_size, s.data_seed)
    return root


def progress(label: str, total: int, every: int = 50):
    """An on_step callback printing the mean loss and step time of the last `every` steps."""
    state = {"t": time.perf_counter(), "losses": []}

    def report(step: int, loss: float) -> None:
        state["losses"].append(loss)
        if step % every == 0 or step == total:
            dt = (time.perf_counter() - state["t"]) / len(state["losses"])
            print(f"{label} step {step}/{total}  loss {sum(state['losses']) / len(state['losses']):.4f}  {dt * 1000:.0f} ms/step", flush=True)
            state["t"], state["losses"] = time.perf_counter(), []

    return report


def train_base(s: Settings, work: Path = WORK, out: Path = BASE_FILE, results: Path = RESULTS) -> Path:
    data = ensure_data(s, work)
    torch.manual_seed(s.seed)
    unet = UNetModel(TOY_BASE_UNET)
    cfg = TrainConfig(lr=s.base_lr, batch_size=s.base_batch, empty_prompt_rate=s.base_empty_prompt_rate, ema_decay=s.base_ema,
                      prediction=s.prediction, seed=s.seed)
    trainer = Trainer(unet, None, ToyPromptEncoder(), encode_image, ControlDataset(data), cfg)
    ckpt = work / "base" / "checkpoint.pt"
    losses_file = work / "base" / "losses.json"
    losses: list[float] = []
    if ckpt.is_file():
        trainer.load_checkpoint(ckpt)
        losses = common.read_json(losses_file)[: trainer.step] if losses_file.is_file() else []
        print(f"base: resumed at step {trainer.step}", flush=True)
    report = progress("base", s.base_steps)

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        report(step, loss)
        if step % 200 == 0:
            write_json(losses_file, losses)

    t0 = time.perf_counter()
    trainer.train(max(0, s.base_steps - trainer.step), checkpoint=ckpt, save_every=200, on_step=on_step)
    write_json(losses_file, losses)
    exported = trainer.ema.copy_to(copy.deepcopy(unet)) if trainer.ema is not None else unet
    save_toy_base(exported, out)
    params = sum(p.numel() for p in unet.parameters())
    write_json(results / "base.json", {"settings": s.to_json(), "parameters": params, "losses": losses,
                                       "seconds_this_run": round(time.perf_counter() - t0, 1)})
    print(f"base: {params / 1e6:.2f} M parameters, wrote {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--out", type=Path, default=BASE_FILE)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args()
    set_threads()
    train_base(QUICK if a.quick else Settings(), a.work, a.out, a.results)


if __name__ == "__main__":
    main()
