"""`python -m controlnet_core.train sd --base CKPT_OR_DIFFUSERS_DIR --data DATA --out OUT --steps N`.

Trains a ControlNet on a real SD1.x/SD2.x/SDXL base model: the UNet, VAE and text encoder(s) come from the
checkpoint (`base_models.load_base_model`), the ControlNet is the base UNet's zero-initialised trainable copy
(`create_from_unet`), and the paper's trainer runs with the toy command's progress line, checkpoints,
`--resume` and Ctrl-C saving. The result is `OUT/controlnet.safetensors` in the v1.1 layout.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

from ..create import create_from_unet
from ..errors import ControlNetError
from ..export import save_ldm
from .data import ControlDataset
from .run_files import CHECKPOINT, check_can_start, resumable
from .trainer import TrainConfig, Trainer

_AMP = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="SD1.x/SD2.x/SDXL checkpoint (.safetensors, .ckpt) or diffusers folder")
    p.add_argument("--data", required=True, help="dataset folder: fill50k layout (prompt.json) or images/ + conditions/ (+ captions/)")
    p.add_argument("--out", required=True, help="output folder: controlnet.safetensors and checkpoint.pt")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps (a resumed run continues up to this)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (the paper's 1e-5)")
    p.add_argument("--resolution", type=int, help="square training size in pixels, a multiple of 8 (default: 512; SDXL 1024; SD2 v 768)")
    p.add_argument("--empty-prompt-rate", type=float, default=0.5, help="share of prompts replaced by '' (the paper's 0.5)")
    p.add_argument("--mixed-precision", choices=list(_AMP), default="no")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run, replacing its files")
    p.add_argument("--tokenizer", help="folder with the CLIP vocab.json + merges.txt (default: searched; see the error if none is found)")
    p.add_argument("--prediction", choices=["auto", "eps", "v"], default="auto",
                   help="what the base predicts; auto: from the file (SD1.x/SDXL eps unless marked v_pred; SD2.x single files must say)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="cache text embeddings (SDXL: with y) and VAE latents here: later epochs and runs call no encoder")


def progress_printer(total: int, batch: int) -> Callable[[int, float], None]:
    """The toy command's progress line: step, loss, time per step, images per second (`batch` images per step)."""
    t0 = [time.perf_counter()]

    def report(step: int, loss: float) -> None:
        dt = time.perf_counter() - t0[0]
        t0[0] = time.perf_counter()
        print(f"step {step}/{total}  loss {loss:.4f}  {dt * 1000:.0f} ms/step  {batch / max(dt, 1e-9):.1f} img/s", flush=True)

    return report


def run(args: argparse.Namespace) -> int:
    """Load the base, create the ControlNet, train, save. Bad input raises `ControlNetError` (exit code 2 in `__main__`)."""
    from ..base_models import load_base_model

    if args.steps < 0 or args.batch < 1:
        raise ControlNetError(f"--steps must be >= 0 and --batch >= 1 (got {args.steps}, {args.batch}).")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise ControlNetError(f"--resolution {args.resolution}: must be a positive multiple of 8 (latents are 1/8 of the image size).")
    # a bad dataset (every unreadable file, size mismatch, and with --resolution the memory limits) is reported
    # before minutes of loading
    dataset = ControlDataset(Path(args.data), size=args.resolution)
    if args.resolution:
        dataset.check_batches(args.batch)
    check_can_start(Path(args.out), resume=args.resume, overwrite=args.overwrite)  # and an earlier run in --out
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = _AMP[args.mixed_precision]
    t0 = time.perf_counter()
    # the locked base is stored in the autocast dtype right away (the trainer would convert it anyway)
    base = load_base_model(args.base, tokenizer=args.tokenizer, dtype=amp or torch.float32, device=device)
    prediction = base.prediction if args.prediction == "auto" else args.prediction
    if prediction is None:
        raise ControlNetError(
            f"{args.base}: an {base.family.label} checkpoint does not say whether it predicts noise or v. Pass --prediction eps "
            "(SD2.x-base, 512 px models) or --prediction v (SD2.x 768-v models)."
        )
    resolution = args.resolution or (768 if base.family.name == "sd2" and prediction == "v" else _DEFAULT_RESOLUTION[base.family.name])
    base.text.image_size = (resolution, resolution)
    ucfg = base.unet.config.encoder
    cn = create_from_unet(base.unet.state_dict(), seed=args.seed, device=device, num_heads=ucfg.num_heads, num_head_channels=ucfg.num_head_channels)
    print(f"base: {base.family.label} from {args.base} ({prediction}-prediction), ControlNet {sum(p.numel() for p in cn.parameters()) / 1e6:.1f} M "
          f"parameters, {resolution} px, on {device} (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch, empty_prompt_rate=args.empty_prompt_rate, seed=args.seed, grad_accum=args.grad_accum,
                      mixed_precision=args.mixed_precision, prediction=prediction, cache_dir=getattr(args, "cache_dir", None))
    if resolution != args.resolution:  # the family's default size: the files are read again (headers, about 0.1 ms each)
        dataset = ControlDataset(Path(args.data), size=resolution)
    trainer = Trainer(base.unet, cn, base.text, base.vae, dataset, cfg)
    out = Path(args.out)
    ckpt = out / CHECKPOINT
    if args.resume and resumable(out):
        trainer.load_checkpoint(ckpt)  # a damaged or missing newest checkpoint: the error names the previous one
        print(f"resumed at step {trainer.step}", flush=True)
    trainer.train(max(0, args.steps - trainer.step), checkpoint=ckpt, save_every=args.save_every, on_step=progress_printer(args.steps, args.batch * args.grad_accum))
    print(f"wrote {save_ldm(cn, out / 'controlnet.safetensors', overwrite=True)}", flush=True)  # the run's own file; check_can_start decided
    return 0


__all__ = ["add_arguments", "run", "progress_printer"]
