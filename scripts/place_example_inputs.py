"""Copies the shipped example images (workflows/inputs/*.png) into a ComfyUI input folder, skipping names taken.

    python scripts/place_example_inputs.py INPUT_DIR [--src DIR]

Called by scripts/run_comfyui.sh (`make run`) so that a shipped workflow's LoadImage finds its image on the first
run. The input folder is the user's: a file already there under an example's name (their own picture, or our
copy they edited) is never replaced, whatever it contains. The check and the creation are one step (an exclusive
create, O_EXCL), so no file appearing between them, nor a symbolic link of that name, is ever written through.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "workflows" / "inputs"


def place(dest: Path, src: Path = SRC) -> list[str]:
    """Copy each src/*.png that has no namesake in `dest` (created if missing); returns the names copied."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for image in sorted(src.glob("*.png")):
        target = dest / image.name
        try:
            out = open(target, "xb")
        except FileExistsError:
            continue  # the user's file (or a link) of that name: theirs, left alone
        try:
            with out, open(image, "rb") as inp:
                shutil.copyfileobj(inp, out)
        except BaseException:
            os.unlink(target)  # never leave a half-written copy that a later run would then keep
            raise
        copied.append(image.name)
    return copied


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path, help="the ComfyUI input folder")
    ap.add_argument("--src", type=Path, default=SRC, help="folder of example images (default: workflows/inputs)")
    args = ap.parse_args(argv)
    copied = place(args.dest, args.src)
    if copied:
        print(f"  example inputs: copied {', '.join(copied)} into {args.dest}")


if __name__ == "__main__":
    main()
