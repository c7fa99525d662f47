"""Command line: `python -m controlnet_core info|convert|create ...`."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from . import ControlNetError, create_from_unet, load_control, save_diffusers, save_ldm
from .export import check_output
from .formats import FORMATS

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlnet_core", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="detect a file's layout and print its architecture")
    info.add_argument("file")
    info.add_argument("--base", help="base UNet/checkpoint, for diff and control-LoRA files")
    conv = sub.add_parser("convert", help="re-save a control file in another layout")
    conv.add_argument("file")
    conv.add_argument("out", help="output .safetensors (ldm) or folder (diffusers)")
    conv.add_argument("--to", choices=["ldm", "diffusers"], default="ldm")
    conv.add_argument("--base")
    conv.add_argument("--dtype", choices=list(_DTYPES), default=None)
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file, or the model in an existing folder")
    create = sub.add_parser("create", help="create a zero-initialised ControlNet from a base UNet/checkpoint")
    create.add_argument("base")
    create.add_argument("out")
    create.add_argument("--hint-channels", type=int, default=3)
    create.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "info":
            lc = load_control(args.file, base_unet=args.base, device="cpu")
            print(f"format: {lc.format} ({FORMATS[lc.format]})")
            print(f"kind:   {lc.kind}")
            print(f"config: {lc.config}")
            print(f"params: {sum(p.numel() for p in lc.model.parameters()):,}")
        elif args.cmd == "convert":
            check_output(args.out, folder=args.to == "diffusers", overwrite=args.overwrite)  # before the load, which may be long
            lc = load_control(args.file, base_unet=args.base)
            dt = _DTYPES[args.dtype] if args.dtype else None
            save = save_ldm if args.to == "ldm" else save_diffusers
            print(f"wrote {save(lc, args.out, dtype=dt, overwrite=args.overwrite)}")
        elif args.cmd == "create":
            check_output(args.out, folder=False, overwrite=args.overwrite)
            model = create_from_unet(args.base, hint_channels=args.hint_channels)
            print(f"wrote {save_ldm(model, args.out, overwrite=args.overwrite)}")
    except ControlNetError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever the message
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
