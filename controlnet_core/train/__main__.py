"""`python -m controlnet_core.train toy-data DIR`, `... toy DATA --out OUT --steps N` and `... sd --base CKPT --data DATA --out OUT --steps N`.

The toy command trains a ControlNet on a toy-world dataset over a seeded random (or given) base UNet, with
a progress line (loss, step time, images/s), checkpoints every --save-every steps, --resume, and Ctrl-C saving.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from .. import ControlNetError, create_from_unet, save_ldm
from ..checkpoint import open_checkpoint
from ..unet import UNetModel, unet_from_state_dict
from . import sd_cli
from .data import ControlDataset
from .run_files import CHECKPOINT, check_can_start, resumable
from .toy import TOY_UNET, ToyTextEncoder, make_fill50k, toy_encode_image
from .trainer import TrainConfig, Trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlnet_core.train")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("toy-data", help="write a toy fill50k-like dataset")
    d.add_argument("dir")
    d.add_argument("--n", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("toy", help="train a ControlNet on a toy dataset")
    t.add_argument("data")
    t.add_argument("--out", required=True)
    t.add_argument("--base", help="base UNet .safetensors (bare keys); default: a seeded random toy UNet")
    t.add_argument("--steps", type=int, default=100, help="total steps (a resumed run continues up to this)")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--empty-prompt-rate", type=float, default=0.5)
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run, replacing its files")
    t.add_argument("--seed", type=int, default=0)
    sd_cli.add_arguments(sub.add_parser("sd", help="train a ControlNet on a real SD1.x/SD2.x/SDXL checkpoint or diffusers folder"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "toy-data":
            print(make_fill50k(Path(args.dir), args.n, seed=args.seed))
            return 0
        if args.cmd == "sd":
            return sd_cli.run(args)
        dataset = ControlDataset(Path(args.data))  # every file checked before the model is built
        dataset.check_batches(args.batch)
        torch.manual_seed(args.seed)
        if args.base:
            src = open_checkpoint(args.base)
            unet = unet_from_state_dict({k: src.get(k) for k in src.keys()})
        else:
            unet = UNetModel(TOY_UNET).eval()
        cn = create_from_unet(unet.state_dict(), seed=args.seed)
        cfg = TrainConfig(lr=args.lr, batch_size=args.batch, empty_prompt_rate=args.empty_prompt_rate, seed=args.seed)
        trainer = Trainer(unet, cn, ToyTextEncoder(dim=unet.config.encoder.context_dim), toy_encode_image, dataset, cfg)
        out = Path(args.out)
        ckpt = out / CHECKPOINT
        check_can_start(out, resume=args.resume, overwrite=args.overwrite)
        if args.resume and resumable(out):
            trainer.load_checkpoint(ckpt)  # a damaged or missing newest checkpoint: the error names the previous one
            print(f"resumed at step {trainer.step}", flush=True)
        t0 = [time.perf_counter()]

        def report(step: int, loss: float) -> None:
            dt = time.perf_counter() - t0[0]
            t0[0] = time.perf_counter()
            print(f"step {step}/{args.steps}  loss {loss:.4f}  {dt * 1000:.0f} ms/step  {args.batch / max(dt, 1e-9):.1f} img/s", flush=True)

        trainer.train(max(0, args.steps - trainer.step), checkpoint=ckpt, save_every=args.save_every, on_step=report)
        print(f"wrote {save_ldm(cn, out / 'controlnet.safetensors', overwrite=True)}", flush=True)  # the run's own file; check_can_start decided
    except ControlNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
