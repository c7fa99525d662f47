"""Experiment 4: step time and peak memory of ControlNet training vs full fine-tuning of the base, same batch.

    python experiments/training_cost.py [--quick] [--repeats 2]

Each (model, mode) runs in a fresh process, so its memory high-water mark is its own. Two memory measures:
- tensors = weights + gradients + AdamW state + the activations autograd saves for backward (counted by storage,
  through `torch.autograd.graph.saved_tensors_hooks`, weights not counted twice): exact, what GPU memory mostly is;
- RSS = peak resident set size (ru_maxrss) minus the RSS before any model exists (after imports, data loading and a
  throwaway step of a tiny network, so PyTorch's one-time set-up is in the baseline): everything the process
  really used, transient buffers and allocator slack included;
- step time = the median of the timed steps (after warm-up), then the fastest median over `repeats` processes
  (the machine is shared: the minimum is the least disturbed measurement).
Modes: `full` (Trainer base mode: every UNet weight trains), `controlnet` (the paper's settings: locked base,
trainable copy), `controlnet_gc` (the same with gradient checkpointing). Models: the toy base (128 px), and an
SD1.5-shaped UNet (SD1.5's levels, blocks, attention and 768-wide context at 128 instead of 320 channels, 256 px),
whose proportions between the hint encoder and the UNet are closer to SD1.5's. Both models use random weights:
cost does not depend on what the weights are.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
from common import RESULTS, write_json

MODELS = {  # name: (model_channels, channel_mult, num_res_blocks, transformer_depth, context_dim, image size, batch)
    "toy": (32, (1, 2, 2), (1, 1, 1), (0, 1, 1), 32, 128, 8),
    "sd15_shaped_128ch": (128, (1, 2, 4, 4), (2, 2, 2, 2), (1, 1, 1, 0), 768, 256, 2),
}
QUICK_MODELS = {"toy": (32, (1, 2, 2), (1, 1, 1), (0, 1, 1), 32, 64, 2)}
MODES = ("full", "controlnet", "controlnet_gc")


def child(model: str, mode: str, steps: int, quick: bool) -> dict:
    """One measurement, in this (fresh) process."""
    import psutil
    import torch
    from common import set_threads

    from controlnet_core import create_from_unet
    from controlnet_core.config import ControlNetConfig
    from controlnet_core.train import ControlDataset, TrainConfig, Trainer
    from controlnet_core.train.toy_world import ToyPromptEncoder, encode_image, make_toy_world
    from controlnet_core.unet import UNetConfig, UNetModel

    set_threads()
    mc, mult, nrb, depth, ctx, size, batch = (QUICK_MODELS if quick else MODELS)[model]
    with tempfile.TemporaryDirectory() as tmp:
        data = ControlDataset(make_toy_world(Path(tmp) / "d", n=2 * batch, size=size))
        items = [data[i] for i in range(len(data))]  # decoded once, before the baseline; the trainer takes the list
    encoder = ToyPromptEncoder(dim=ctx, tokens=77 if ctx == 768 else 8)

    def build(mc_: int, mult_: tuple, nrb_: tuple, depth_: tuple, batch_: int, mode_: str) -> Trainer:
        torch.manual_seed(0)
        cfg = UNetConfig(ControlNetConfig(model_channels=mc_, channel_mult=mult_, num_res_blocks=nrb_, transformer_depth=depth_, context_dim=ctx))
        unet = UNetModel(cfg)
        cn = None if mode_ == "full" else create_from_unet(unet.state_dict(), seed=0)
        config = TrainConfig(lr=1e-5, batch_size=batch_, gradient_checkpointing=mode_.endswith("_gc"))
        return Trainer(unet, cn, encoder, encode_image, items, config)

    build(32, (1, 2), (1, 1), (0, 1), 1, mode).train_step()  # PyTorch's one-time set-up, so that the baseline holds it
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    trainer = build(mc, mult, nrb, depth, batch, mode)
    times = []
    for i in range(steps + 2):  # two warm-up steps (allocator, AdamW state)
        t0 = time.perf_counter()
        trainer.train_step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    tensors = tensor_memory(trainer)
    return {"model": model, "mode": mode, "batch": batch, "image_size": size, "threads": torch.get_num_threads(),
            "step_s_median": statistics.median(times), "step_s": [round(t, 4) for t in times],
            "rss_bytes": peak - rss0, "peak_rss_bytes": peak, "rss_before_models_bytes": rss0, **tensors,
            "trained_parameters": sum(p.numel() for p in trainer.trained.parameters()),
            "unet_parameters": sum(p.numel() for p in trainer.unet.parameters())}


def tensor_memory(trainer) -> dict:
    """Bytes of weights, gradients, AdamW state, and activations saved for backward during one more step."""
    import torch

    modules = [trainer.unet] + ([trainer.controlnet] if trainer.controlnet is not None else [])
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step()
    grads = sum(p.grad.nbytes for m in modules for p in m.parameters() if p.grad is not None)
    optim = sum(v.nbytes for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.ndim > 0)
    weights, activations = sum(params.values()), sum(saved.values())
    return {"weights_bytes": weights, "grad_bytes": grads, "optimizer_bytes": optim, "activation_bytes": activations,
            "tensor_bytes": weights + grads + optim + activations}


def measure(quick: bool, repeats: int, steps: int) -> dict:
    from common import set_threads

    threads = set_threads()
    runs: dict = {}
    models = QUICK_MODELS if quick else MODELS
    for _ in range(repeats):  # interleaved, so a busy minute on the shared machine hits every mode alike
        for model in models:
            for mode in MODES:
                cmd = [sys.executable, __file__, "--child", model, mode, "--steps", str(steps)] + (["--quick"] if quick else [])
                env = {**os.environ, "CNS_THREADS": str(threads)}  # every child the same count, whatever the load then
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                res = json.loads(out.strip().splitlines()[-1])
                runs.setdefault(model, {}).setdefault(mode, []).append(res)
                print(f"{model:>18} {mode:>14}  {res['step_s_median'] * 1000:7.0f} ms/step  tensors {res['tensor_bytes'] / 2**20:7.1f} MiB"
                      f"  RSS {res['rss_bytes'] / 2**20:7.1f} MiB", flush=True)
    summary = {}
    for model, modes in runs.items():
        best = {m: {"step_s": min(x["step_s_median"] for x in rs), "rss_bytes": min(x["rss_bytes"] for x in rs),
                    **{k: rs[0][k] for k in ("weights_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "tensor_bytes")},
                    "trained_parameters": rs[0]["trained_parameters"], "unet_parameters": rs[0]["unet_parameters"],
                    "batch": rs[0]["batch"], "image_size": rs[0]["image_size"], "threads": rs[0]["threads"]} for m, rs in modes.items()}
        for m in best:
            best[m]["time_vs_full"] = round(best[m]["step_s"] / best["full"]["step_s"], 3)
            best[m]["tensor_memory_vs_full"] = round(best[m]["tensor_bytes"] / best["full"]["tensor_bytes"], 3)
            best[m]["rss_vs_full"] = round(best[m]["rss_bytes"] / best["full"]["rss_bytes"], 3)
        summary[model] = best
    return {"summary": summary, "runs": runs, "repeats": repeats, "timed_steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps, a.quick)))
        return
    result = measure(a.quick, a.repeats, a.steps)
    write_json(a.results / "training_cost.json", result)
    for model, modes in result["summary"].items():
        for m, v in modes.items():
            print(f"{model}: {m}: {v['time_vs_full']:.2f}x time, {v['tensor_memory_vs_full']:.2f}x tensor memory, "
                  f"{v['rss_vs_full']:.2f}x RSS of full fine-tuning")


if __name__ == "__main__":
    main()
