"""The OpenCV annotator nodes against raw OpenCV plus the conversion ComfyUI's IMAGE type forces, in one run.

A ComfyUI IMAGE is float32 (B, H, W, 3) in [0, 1]; OpenCV works on uint8. So even the leanest hand-written node has to
convert each image to uint8 and its map back to a 3-channel float image. The reference ("raw + conversion") does
exactly that and nothing else, with the cheapest exact calls known here: `cv2.convertScaleAbs(x, alpha=255)` in, the
recipe on the uint8 image, gray -> RGB on the bytes and a float32 table lookup (x / 255) into the batch out. Our node
(`ControlNetSuiteAnnotator_<key>().run`, as ComfyUI calls it, no resize: resolution = image size) is timed against it
in the same process, interleaved, best of --reps. ratio = reference time / node time (1.0 = as fast; goal >= 0.8).
Raw `cv2.Canny` on a ready uint8 image (no conversion at all) is printed too, for the ratio the issue quoted.

    .venv/bin/python bench/bench_canny_node.py [--reps 20] [--size 512] [--batch 8] [--annotators canny binary ...]
"""
from __future__ import annotations

import argparse
import functools
import tempfile
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import torch
from common import alternate, machine

# the node's own settings for each annotator (its widgets' defaults), and the recipe alone on a uint8 RGB image
SETTINGS = {
    "canny": {"low_threshold": 100, "high_threshold": 200},
    "binary": {"threshold": 0},
    "scribble_threshold": {"threshold": 127},
    "scribble_xdog": {"threshold": 32},
    "lineart_standard": {"gaussian_sigma": 6.0, "intensity_threshold": 8},
    "tile": {"pyramid_levels": 1, "blur_sigma": 0.0},
}
TO_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def images(batch: int, size: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """A photo-like batch (blurred noise: edges everywhere, as in bench_annotators) as IMAGE and as uint8 arrays."""
    rng = np.random.default_rng(0)
    u8 = [cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (0, 0), 3) for _ in range(batch)]
    image = torch.from_numpy(np.stack(u8)).float() / 255.0  # (B, H, W, 3), exactly representable values
    return image.contiguous(), u8


def raw_with_conversion(recipe, image: torch.Tensor):
    """float IMAGE -> uint8 -> recipe -> float IMAGE, the least work an exact conversion needs."""

    def run():
        out = torch.empty(image.shape, dtype=torch.float32)
        for src, dst in zip(image.numpy(), out.numpy()):
            m = recipe(cv2.convertScaleAbs(src.reshape(src.shape[0], -1), alpha=255.0).reshape(src.shape))
            cv2.LUT(cv2.cvtColor(m, cv2.COLOR_GRAY2RGB) if m.ndim == 2 else m, TO_FLOAT, dst=dst)
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--annotators", nargs="*", default=list(SETTINGS))
    args = ap.parse_args()
    from comfy_host import import_comfy

    import_comfy(cpu=True)
    from host import Host

    image, u8 = images(args.batch, args.size)
    print(f"# OpenCV annotator nodes, {args.batch} images {args.size}x{args.size}, per-image ms (best of {args.reps}); "
          f"{date.today()}, {machine()}, OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads)")
    with tempfile.TemporaryDirectory() as d:
        host = Host(Path(d))
        M = host.nodes.NODE_CLASS_MAPPINGS
        import sys

        registry = sys.modules[M["ControlNetSuiteAnnotator_canny"].__module__].registry
        for key in args.annotators:
            kw = SETTINGS[key]
            node = M[f"ControlNetSuiteAnnotator_{key}"]()
            det = registry.load(key)
            recipe = functools.partial(det.one, **kw)
            want = raw_with_conversion(recipe, image)()
            got = node.run(image, resolution=args.size, pixel_perfect=False, **kw)[0]
            if not torch.equal(got, want):  # the comparison only means something for the same output
                raise SystemExit(f"{key}: the node's output differs from raw OpenCV + conversion")
            runs = {
                "node": lambda node=node, kw=kw: node.run(image, resolution=args.size, pixel_perfect=False, **kw),
                "raw + conversion": raw_with_conversion(recipe, image),
            }
            if key == "canny":
                runs["raw cv2.Canny on uint8"] = lambda: [cv2.Canny(i, 100, 200) for i in u8]
            t = alternate(runs, args.reps, stat=min)
            per = {k: v / args.batch * 1000 for k, v in t.items()}
            line = f"{key:18} node {per['node']:6.2f}  raw + conversion {per['raw + conversion']:6.2f}  ratio {t['raw + conversion'] / t['node']:.2f}x"
            if key == "canny":
                line += f"  |  raw cv2.Canny on uint8 {per['raw cv2.Canny on uint8']:6.2f} ({t['raw cv2.Canny on uint8'] / t['node']:.2f}x of it)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
