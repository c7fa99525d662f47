"""One controlled denoising step, full SD1.5 shapes: UNet + our ControlNet vs UNet + ComfyUI's built-in ControlNet.

Same random weights (one safetensors file loaded by both loaders), same UNet (ComfyUI's own
UNetModel), 256x256 (latent 32x32), batch 2 (cond + uncond), fp32, on the CPU unless --device says
otherwise. Steps are interleaved and the median is printed, with the ratio ours / ComfyUI.
Also prints the FLOP floor (ControlNet and hint encoder as a share of the UNet's FLOPs at 512 px).

    .venv/bin/python bench/bench_step.py [--device cuda --dtype fp16] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import alternate, machine

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def flop_floor() -> str:
    """FLOPs of UNet, ControlNet and hint encoder for one 512 px sample (real CPU tensors: ComfyUI's attention queries device memory)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from factories import SD15, comfy_unet_kwargs
    from torch.utils.flop_counter import FlopCounterMode

    from controlnet_core import ControlNet

    unet = UNetModel(**comfy_unet_kwargs(SD15), device="cpu", operations=comfy.ops.manual_cast).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.01)
    cn = ControlNet(SD15).eval()
    x, t, ctx = torch.randn(1, 4, 64, 64), torch.ones(1), torch.randn(1, 77, 768)
    hint = torch.rand(1, 3, 512, 512)

    def count(fn):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            fn()
        return fc.get_total_flops()

    try:
        fu = count(lambda: unet(x, t, ctx))
        fc = count(lambda: cn(x, hint, t, ctx))
        cn.clear_hint_cache()
        fh = count(lambda: cn.input_hint_block(hint))
    except Exception as e:  # counting is informative only
        return f"FLOP count unavailable ({type(e).__name__}: {e})"
    return (f"FLOPs per 512px sample: UNet {fu / 1e9:.0f} G, ControlNet {fc / 1e9:.0f} G ({fc / fu:.1%} of the UNet), "
            f"hint encoder {fh / 1e9:.1f} G ({fh / fu:.1%}); floor for a controlled step = {1 + fc / fu:.3f}x the UNet alone, "
            f"{1 + (fc - fh) / fu:.3f}x with the hint cached")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from comfy_host import import_comfy

    import_comfy(cpu=args.device == "cpu")
    import comfy.controlnet
    from factories import SD15, comfy_control_dict, comfy_unet, inputs, random_controlnet, save

    from controlnet_core import load_control

    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    with tempfile.TemporaryDirectory() as d:
        path = save(Path(d) / "control_sd15_random.safetensors", random_controlnet(SD15).state_dict())
        ours = load_control(path, dtype=dt, device=dev).model
        theirs = comfy.controlnet.load_controlnet(str(path)).control_model.to(dev, dt)
    unet = comfy_unet(SD15).to(dev, dt)
    x, hint, t, ctx, _ = (a.to(dev, dt) if a is not None else None for a in inputs(SD15, batch=args.batch, latent=args.size // 8, tokens=77))

    @torch.no_grad()
    def step_ours():
        return unet(x, t, ctx, control=comfy_control_dict(ours(x, hint, t, ctx)))

    @torch.no_grad()
    def step_comfy():
        out = theirs(x, hint, t, ctx)
        if isinstance(out, dict):
            control = {"input": [], "middle": list(out["middle"]), "output": list(out["output"])}
        else:
            control = {"input": [], "middle": [out[-1]], "output": list(out[:-1])}
        return unet(x, t, ctx, control=control)

    @torch.no_grad()
    def step_plain():
        return unet(x, t, ctx)

    @torch.no_grad()
    def cn_ours():
        return ours(x, hint, t, ctx)

    @torch.no_grad()
    def cn_comfy():
        return theirs(x, hint, t, ctx)

    samples = alternate({"ours": step_ours, "comfy": step_comfy, "unet only": step_plain, "cn ours": cn_ours, "cn comfy": cn_comfy}, args.reps, sync, stat=list)
    res = {k: statistics.median(v) for k, v in samples.items()}
    best = {k: min(v) for k, v in samples.items()}
    print(f"# controlled step, SD1.5 shapes, {args.size}px, batch {args.batch}, {args.dtype} on {args.device}, {args.reps} interleaved reps; {machine()}")
    for k in res:
        print(f"{k:10} median {res[k] * 1000:9.1f} ms   best {best[k] * 1000:9.1f} ms")
    print(f"step ratio ours / ComfyUI built-in, best of {args.reps}: {best['ours'] / best['comfy']:.3f}x")
    print(f"ControlNet-only ratio ours / ComfyUI, best of {args.reps}: {best['cn ours'] / best['cn comfy']:.3f}x")
    print(f"step ratio ours / ComfyUI built-in, median: {res['ours'] / res['comfy']:.3f}x")
    print(f"ControlNet-only ratio ours / ComfyUI, median: {res['cn ours'] / res['cn comfy']:.3f}x")
    print(f"controlled step / UNet alone: ours {res['ours'] / res['unet only']:.3f}x, ComfyUI {res['comfy'] / res['unet only']:.3f}x")
    print(flop_floor())


if __name__ == "__main__":
    main()
