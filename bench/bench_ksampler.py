"""Full KSampler runs with 1, 2 and 3 ControlNets: our nodes vs ComfyUI's built-in nodes, same files.

Tiny SD1.5-shaped model (320 channels, one level), 4 steps, 256 px, batch 1, cfg 6 (cond and uncond
batched), CPU fp32. ComfyUI's own KSampler node runs in both cases; only the ControlNet loader/apply
nodes differ. Runs are interleaved; best and median of --reps are printed, with the ratio per count.

    .venv/bin/python bench/bench_ksampler.py [--reps 5] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import alternate, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from comfy_host import import_comfy

    import_comfy(cpu=args.device == "cpu")
    from factories import random_controlnet, save
    from host import TINY_UNET, Host

    with tempfile.TemporaryDirectory() as d:
        host = Host(Path(d), cpu=args.device == "cpu")
        M = host.nodes.NODE_CLASS_MAPPINGS
        names = []
        for i in range(3):
            names.append(f"cn_{i}.safetensors")
            save(host.dirs["controlnet"] / names[-1], {k: v * 0.3 for k, v in random_controlnet(TINY_UNET, seed=i).state_dict().items()})
        model, clip, vae = M["CheckpointLoaderSimple"]().load_checkpoint(host.checkpoint)[:3]
        g = torch.Generator().manual_seed(0)
        pos = [[torch.randn(1, 77, 768, generator=g), {}]]
        neg = [[torch.randn(1, 77, 768, generator=g), {}]]
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
        hints = [torch.rand(1, args.size, args.size, 3, generator=g) for _ in range(3)]
        ours_cn = [M["ControlNetSuiteLoader"]().load(n)[0] for n in names]
        stock_cn = [M["ControlNetLoader"]().load_controlnet(n)[0] for n in names]

        def conds(kind: str, n: int):
            p, q = pos, neg
            for i in range(n):
                if kind == "ours":
                    p, q = M["ControlNetSuiteApply"]().apply(p, q, ours_cn[i], hints[i], 0.8, 0.0, 1.0, "balanced", "crop and resize")
                else:
                    p, q = M["ControlNetApplyAdvanced"]().apply_controlnet(p, q, stock_cn[i], hints[i], 0.8, 0.0, 1.0)
            return p, q

        def run(kind: str, n: int):
            p, q = conds(kind, n)
            return lambda: M["KSampler"]().sample(model, 1, args.steps, 6.0, "euler", "normal", p, q, latent, denoise=1.0)

        # same result check before timing (balanced mode: our nodes reproduce the built-in ones)
        a, b = run("ours", 3)()[0]["samples"], run("stock", 3)()[0]["samples"]
        print(f"# KSampler, tiny SD1.5-shaped (320 ch), {args.steps} steps, {args.size}px, {args.device}; {machine()}")
        print(f"3-ControlNet latents, ours vs built-in: max abs diff {(a - b).abs().max().item():.2e} (latent std {b.std().item():.3f})")
        for n in (1, 2, 3):
            fns = {"ours": run("ours", n), "built-in": run("stock", n)}
            samples = alternate(fns, args.reps, stat=list)
            best = {k: min(v) for k, v in samples.items()}
            med = {k: statistics.median(v) for k, v in samples.items()}
            print(f"{n} ControlNet(s): ours {best['ours'] * 1000:8.1f} ms, built-in {best['built-in'] * 1000:8.1f} ms (best of {args.reps}); "
                  f"ratio {best['ours'] / best['built-in']:.3f}x best, {med['ours'] / med['built-in']:.3f}x median")


if __name__ == "__main__":
    main()
