"""One ControlNet training step at SD1.5 shapes (random weights, fp32, batch 1, CPU): our Trainer against the training
loop of diffusers' `examples/controlnet/train_controlnet.py`, and our gradient-checkpointing scopes against each other.

Both comparisons run each case in a fresh process, so the kernel's own accounting gives the memory: baseline = VmRSS
once the models are loaded, peak = VmHWM after the steps (activations, gradients and the AdamW state). Time: the
median of the timed steps after one untimed warm-up step (which also creates the optimizer state).

`--compare diffusers` (default size 256 px, as the review that found issue 15's numbers): the same SD1.5 UNet and
ControlNet weights on both sides (diffusers' models saved as a diffusers folder and read by our loaders), the same
latents, text, timesteps and noise per step (one seeded generator, drawn in our Trainer's order), AdamW at 1e-5.
diffusers' side is the script's loop: ControlNet -> residuals -> UNet -> MSE against the noise, backward, optimizer
step, `zero_grad(set_to_none=False)` (the script's default). No gradient checkpointing on either side unless
`--checkpointing` (then diffusers' `enable_gradient_checkpointing()` on its ControlNet, ours scope "controlnet").
Prints ours / diffusers for time and peak memory, and the losses of both, which must agree.

`--compare scopes` (default sizes 512 and 1024 px): our Trainer with gradient checkpointing off, scope "controlnet"
(the trainable copy's blocks, as diffusers) and scope "all" (also the hint encoder and the locked UNet's blocks).

    .venv/bin/python bench/bench_train.py --compare diffusers [--size 256] [--steps 3]
    .venv/bin/python bench/bench_train.py --compare scopes [--sizes 512 1024] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, proc_status_kib

CONTEXT = (77, 768)  # SD1.5's CLIP text: 77 tokens of 768
SEED = 0


def sd15_unet_kwargs() -> dict:
    """diffusers' UNet2DConditionModel config of SD1.5 (v1-5's unet/config.json)."""
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def write_models(root: Path) -> None:
    """Random SD1.5 UNet (every weight non-zero) and the ControlNet diffusers makes from it, as diffusers folders."""
    import diffusers
    import torch

    torch.manual_seed(SEED)
    unet = diffusers.UNet2DConditionModel(**sd15_unet_kwargs())
    controlnet = diffusers.ControlNetModel.from_unet(unet)  # the copy, zero convs at 0, a fresh hint encoder
    unet.save_pretrained(root / "unet", safe_serialization=True)
    controlnet.save_pretrained(root / "controlnet", safe_serialization=True)


def encode_image(images):
    """Stand-in for the VAE (outside the step on both sides): 8x average pooling, 4 channels, SD1.5's latent size."""
    import torch
    import torch.nn.functional as F

    pooled = F.avg_pool2d(images * 2 - 1, 8)
    return torch.cat([pooled, pooled[:, :1]], 1)


class Pairs:
    """A dataset of one fixed (image, hint, prompt) sample, as our Trainer reads datasets."""

    def __init__(self, size: int):
        import torch

        g = torch.Generator().manual_seed(SEED + 1)
        self.item = {"target": torch.rand(3, size, size, generator=g), "hint": torch.rand(3, size, size, generator=g), "prompt": "a photo"}

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict:
        return self.item


def context():
    import torch

    return torch.randn(1, *CONTEXT, generator=torch.Generator().manual_seed(SEED + 2))


def run_case(case: str, root: Path, size: int, steps: int) -> dict:
    """In a fresh process: load, warm-up step, `steps` timed steps."""
    import torch

    torch.manual_seed(SEED)
    ds, ctx = Pairs(size), context()
    if case == "diffusers" or case == "diffusers-ckpt":
        import diffusers
        import torch.nn.functional as F

        unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").requires_grad_(False)
        controlnet = diffusers.ControlNetModel.from_pretrained(root / "controlnet")
        controlnet.train()
        if case == "diffusers-ckpt":
            controlnet.enable_gradient_checkpointing()
        scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
        optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=0.0)
        gen = torch.Generator().manual_seed(SEED)
        batch = {k: v[None] if torch.is_tensor(v) else [v] for k, v in ds.item.items()}

        def step() -> float:
            with torch.no_grad():
                latents = encode_image(batch["target"])
            t = torch.randint(0, 1000, (1,), generator=gen)  # our Trainer's draw order: timesteps, then noise
            noise = torch.randn(latents.shape, generator=gen)
            noisy = scheduler.add_noise(latents, noise, t)
            down, mid = controlnet(noisy, t, encoder_hidden_states=ctx, controlnet_cond=batch["hint"], return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # train_controlnet.py's default (--set_grads_to_none off)
            return loss.item()
    else:
        from controlnet_core import load_control
        from controlnet_core.base_models import load_unet
        from controlnet_core.train import TrainConfig, Trainer

        scope = {"ours": False, "ours-controlnet": "controlnet", "ours-all": "all"}[case]
        unet = load_unet(root)
        controlnet = load_control(root / "controlnet").model
        cfg = TrainConfig(lr=1e-5, batch_size=1, empty_prompt_rate=0.0, seed=SEED, gradient_checkpointing=scope)
        trainer = Trainer(unet, controlnet, lambda prompts: ctx.expand(len(prompts), -1, -1), encode_image, ds, cfg)
        step = trainer.train_step
    baseline = proc_status_kib("VmRSS")
    losses, times = [step()], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"baseline_kib": baseline, "peak_kib": proc_status_kib("VmHWM"), "times": times, "losses": losses}


def measure(case: str, root: Path, size: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", case, "--root", str(root), "--size", str(size), "--steps", str(steps)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{case} at {size} px failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(label: str, r: dict) -> str:
    held = (r["peak_kib"] - r["baseline_kib"]) / 2**20
    return (f"{label:22} step median {statistics.median(r['times']):7.2f} s (of {len(r['times'])})  peak {r['peak_kib'] / 2**20:6.2f} GiB  "
            f"above the loaded models {held:6.2f} GiB  losses {', '.join(f'{x:.6f}' for x in r['losses'])}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", choices=["diffusers", "scopes"], default="diffusers")
    ap.add_argument("--size", type=int, default=256, help="--compare diffusers: image side in pixels")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="--compare scopes: image sides in pixels")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--checkpointing", action="store_true", help="--compare diffusers: both sides checkpoint their ControlNet")
    args = ap.parse_args()
    print(f"# ControlNet training step, SD1.5 shapes, random weights, fp32, batch 1; {machine()}")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        t0 = time.perf_counter()
        write_models(root)
        print(f"# wrote the SD1.5 UNet and its ControlNet (diffusers folders) in {time.perf_counter() - t0:.0f} s")
        if args.compare == "diffusers":
            cases = ["ours-controlnet", "diffusers-ckpt"] if args.checkpointing else ["ours", "diffusers"]
            r = {c: measure(c, root, args.size, args.steps) for c in cases}
            for c in cases:
                print(report(f"{c} {args.size} px", r[c]))
            ours, theirs = r[cases[0]], r[cases[1]]
            # the peak totals compare; "above the loaded models" does not: diffusers maps the files, so its baseline
            # counts only the pages touched by then
            print(f"ours / diffusers: step time {statistics.median(ours['times']) / statistics.median(theirs['times']):.3f}x, "
                  f"peak {ours['peak_kib'] / theirs['peak_kib']:.3f}x; "
                  f"largest loss difference {max(abs(a - b) for a, b in zip(ours['losses'], theirs['losses'])):.2e}")
            return
        for size in args.sizes:
            r = {}
            for c in ("ours", "ours-controlnet", "ours-all"):
                r[c] = measure(c, root, size, args.steps)
                print(report(f"{c} {size} px", r[c]), flush=True)
            base_t = statistics.median(r["ours"]["times"])
            base_m = r["ours"]["peak_kib"] - r["ours"]["baseline_kib"]
            for c in ("ours-controlnet", "ours-all"):
                m = r[c]["peak_kib"] - r[c]["baseline_kib"]
                print(f"{size} px {c}: time {statistics.median(r[c]['times']) / base_t:.3f}x of no checkpointing, memory above the "
                      f"models {m / base_m:.3f}x ({(base_m - m) / 2**20:.2f} GiB saved)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        a = argparse.ArgumentParser()
        a.add_argument("--case")
        a.add_argument("--root", type=Path)
        a.add_argument("--size", type=int)
        a.add_argument("--steps", type=int)
        ns = a.parse_args()
        print(json.dumps(run_case(ns.case, ns.root, ns.size, ns.steps)))
    else:
        main()
