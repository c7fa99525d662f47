"""`make demo`: sample the shipped toy base + toy ControlNet and write conditions next to results.

    python experiments/demo.py [--n 8] [--steps 20] [--out demo/out/toy_demo.png]

The ControlNet file is read by `controlnet_core.load_control` (v1.1 ldm layout) and its residuals are injected
into the base UNet at every sampling step (DDIM, classifier-free guidance 3). The PNG's rows: the conditions,
the base model alone, the base model + ControlNet (same prompt, same starting noise). The controllability score
(IoU between the generated shape and the outlined one; see controlnet_core.train.toy_metrics) is printed for both.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
import torch.nn.functional as F
from common import BASE_FILE, CONTROLNET_FILE, DEMO, Settings, eval_set, set_threads

from controlnet_core.train.toy_sample import load_toy_base, load_toy_controlnet, score


def grid(hints: torch.Tensor, plain: torch.Tensor, controlled: torch.Tensor, prompts: list[str], ious: tuple) -> np.ndarray:
    """Three rows (condition, base model alone, base + ControlNet), one column per condition; the prompt's colours
    above each column and each image's IoU under it."""
    import cv2

    n, w = hints.shape[0], hints.shape[-1] + 2  # a 2-pixel white gap after each image
    margin, band = 118, 18
    white = lambda h: np.full((h, margin + n * w, 3), 255, np.uint8)  # noqa: E731

    def put(img: np.ndarray, text: str, x: int, y: int) -> None:
        cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)

    head = white(band)
    for i, p in enumerate(prompts):
        words = p.split()  # "<fg> circle with <bg> background"
        put(head, f"{words[0]} on {words[3]}" if len(words) >= 4 else (p or '""'), margin + i * w + 4, 13)
    parts = [head]
    for title, images, scores in (("condition", hints, None), ("base model", plain, ious[0]), ("+ ControlNet", controlled, ious[1])):
        row = torch.cat([F.pad(im, (0, 2, 0, 2), value=1.0) for im in images], 2).permute(1, 2, 0).numpy()
        row = np.concatenate([np.full((row.shape[0], margin, 3), 255, np.uint8), (row * 255).round().astype(np.uint8)], 1)
        put(row, title, 6, w // 2 + 4)
        parts.append(row)
        if scores is not None:
            under = white(band)
            put(under, "IoU", 6, 13)
            for i, v in enumerate(scores):
                put(under, f"{v:.2f}", margin + i * w + w // 2 - 14, 13)
            parts.append(under)
    return np.concatenate(parts, 0)


def run_demo(n: int = 8, steps: int = 20, out: Path = DEMO / "out" / "toy_demo.png", base: Path = BASE_FILE,
             controlnet: Path = CONTROLNET_FILE, s: Optional[Settings] = None) -> dict:
    import cv2

    s = s if s is not None else Settings()
    t0 = time.perf_counter()
    unet = load_toy_base(base)
    cn = load_toy_controlnet(controlnet)
    hints, prompts = eval_set(n)
    kw = dict(steps=steps, cfg=s.cfg, prediction=s.prediction, seed=s.seed)
    plain, iou_plain = score(unet, None, hints, prompts, **kw)
    controlled, iou_cn = score(unet, cn, hints, prompts, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), grid(hints, plain, controlled, prompts, (iou_plain.tolist(), iou_cn.tolist()))[:, :, ::-1])
    seconds = time.perf_counter() - t0
    print(f"wrote {out}", flush=True)
    print(f"controllability (mean IoU of generated vs outlined shape, {n} conditions, DDIM {steps} steps, CFG {s.cfg}):")
    print(f"  base model alone:      {iou_plain.mean():.3f}")
    print(f"  base + ControlNet:     {iou_cn.mean():.3f}")
    print(f"({seconds:.1f} s, {torch.get_num_threads()} threads)")
    return {"iou_base": float(iou_plain.mean()), "iou_controlnet": float(iou_cn.mean()), "seconds": seconds, "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="conditions (rows)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--out", type=Path, default=DEMO / "out" / "toy_demo.png")
    ap.add_argument("--base", type=Path, default=BASE_FILE)
    ap.add_argument("--controlnet", type=Path, default=CONTROLNET_FILE)
    a = ap.parse_args()
    set_threads()
    run_demo(a.n, a.steps, a.out, a.base, a.controlnet)


if __name__ == "__main__":
    main()
