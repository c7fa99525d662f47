"""Several conditions on a union ControlNet: one fused forward (ControlNet Union (Suite)) vs one unit per condition.

Full SDXL ProMax shapes (8 types, random weights), 512x512 (latent 64x64), batch 2 (cond + uncond), fp32 on the CPU
unless --device says otherwise. One sampling step's ControlNet work, interleaved, medians, against two peers:
- a stack of N units of the same file (one forward per condition with its own type, residuals summed); the units
  share the loaded model and so its one-entry hint cache, and re-encode their hints every step;
- N times one forward with its hint cached: the best N separate units could do.

    .venv/bin/python bench/bench_union.py [--conditions 2 3] [--latent 64] [--device cuda --dtype fp16] [--reps 3]
"""
from __future__ import annotations

import argparse

import torch
from common import alternate, machine

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--conditions", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from factories import SDXL, randomize_

    from controlnet_core import ControlNet, ControlNetConfig, combine

    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    torch.manual_seed(0)
    cfg = ControlNetConfig(**{**SDXL.__dict__, "union_types": 8})
    net = randomize_(ControlNet(cfg), 1).to(dev, dt).eval().requires_grad_(False)
    n = args.latent
    x = torch.randn(2, 4, n, n, device=dev, dtype=dt)
    t = torch.tensor([500.0, 500.0], device=dev)
    ctx = torch.randn(2, 77, 2048, device=dev, dtype=dt)
    y = torch.randn(2, 2816, device=dev, dtype=dt)
    hints = [torch.rand(1, 3, 8 * n, 8 * n, device=dev, dtype=dt) for _ in range(max(args.conditions))]
    print(f"machine: {machine()}; SDXL ProMax union, {sum(p.numel() for p in net.parameters()) / 1e6:.0f} M parameters, "
          f"{8 * n} px, batch 2, {args.dtype}, {args.device}")

    for k in args.conditions:
        types, hs = list(range(k)), hints[:k]
        with torch.no_grad():
            times = alternate({
                # one unit, k conditions: the fused hint is cached across steps
                "fused": lambda hs=hs, types=types: net(x, hs, t, ctx, y, control_types=types),
                # a stack of k units of the same file shares one model, so each unit re-encodes its hint every step
                "stack": lambda hs=hs, types=types: combine([net(x, h, t, ctx, y, control_types=[ty]) for h, ty in zip(hs, types)]),
                # the best k separate units could do: k forwards with their hints cached
                "single": lambda hs=hs, types=types: net(x, hs[0], t, ctx, y, control_types=types[:1]),
            }, args.reps, sync)
        ideal = k * times["single"]
        print(f"{k} conditions per step: fused {times['fused'] * 1e3:.0f} ms; a stack of {k} units {times['stack'] * 1e3:.0f} ms "
              f"(**{times['fused'] / times['stack']:.2f}x**); {k} units with cached hints {ideal * 1e3:.0f} ms "
              f"(**{times['fused'] / ideal:.2f}x**)")


if __name__ == "__main__":
    main()
