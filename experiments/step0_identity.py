"""Experiment 1: at step 0 the controlled model samples exactly what the base model samples.

    python experiments/step0_identity.py [--quick]

A ControlNet fresh from `create_from_unet` (zero convs) is attached to the shipped toy base and the fixed
evaluation set is sampled with and without it, same seed, same prompts, classifier-free guidance on: the
images and the final latents are compared element by element (max abs difference, and bitwise equality).
For contrast, the ablation's ControlNet with ordinary convs (re-initialised as in `train_controlnet.random50`)
is sampled the same way at its step 0.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
from common import BASE_FILE, QUICK, RESULTS, Settings, eval_set, set_threads, write_json
from train_controlnet import randomize_zero_layers

from controlnet_core import create_from_unet
from controlnet_core.train.toy_sample import load_toy_base, sample


def step0(s: Settings, base: Path = BASE_FILE, results: Path = RESULTS) -> dict:
    unet = load_toy_base(base)
    hints, prompts = eval_set(s.eval_n)
    kw = dict(steps=s.ddim_steps, cfg=s.cfg, prediction=s.prediction, seed=s.seed)
    plain = sample(unet, None, hints, prompts, **kw)
    zero_cn = create_from_unet(unet.state_dict(), seed=s.seed)
    controlled = sample(unet, zero_cn, hints, prompts, **kw)
    random_cn = randomize_zero_layers(create_from_unet(unet.state_dict(), seed=s.seed), s.seed)
    randomised = sample(unet, random_cn, hints, prompts, **kw)
    result = {
        "images": int(plain.shape[0]), "ddim_steps": s.ddim_steps, "cfg": s.cfg,
        "zero_convs_max_abs_diff": float((controlled - plain).abs().max()),
        "zero_convs_bitwise_equal": bool((controlled == plain).all()),
        "random_convs_max_abs_diff": float((randomised - plain).abs().max()),
        "random_convs_mean_abs_diff": float((randomised - plain).abs().mean()),
    }
    write_json(results / "step0.json", result)
    print(f"step 0: zero convs: max |controlled - base| = {result['zero_convs_max_abs_diff']} "
          f"(bitwise equal: {result['zero_convs_bitwise_equal']}); ordinary convs: max {result['random_convs_max_abs_diff']:.3f}, "
          f"mean {result['random_convs_mean_abs_diff']:.3f} (images in [0, 1])", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base", type=Path, default=BASE_FILE)
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args()
    set_threads()
    step0(QUICK if a.quick else Settings(), a.base, a.results)


if __name__ == "__main__":
    main()
