"""How close each annotator network runs to this CPU's float32 compute ceiling (ours and controlnet-aux's).

For each network at the size it runs at for a 512x512 image (OpenPose body: 184x184), one image: FLOPs (torch.utils.flop_counter, convolutions and matmuls), our and
controlnet-aux's network time (same random weights, interleaved, best of the runs), and the GFLOP/s each reaches,
against the GFLOP/s of a large float32 matrix product on the same threads (a practical ceiling: convolutions cannot
beat it). When both sides already run near the ceiling, no rewrite that keeps the FLOPs can make ours much faster.

    .venv/bin/python bench/bench_annotator_flops.py [--reps 5]
"""
from __future__ import annotations

import argparse

import torch
from common import alternate, machine


def gemm_gflops(reps: int) -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    best = alternate({"mm": lambda: torch.mm(a, b)}, reps, stat=min)["mm"]
    return 2 * 4096**3 / best / 1e9


def flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        module(x)
    return fc.get_total_flops()


def networks():
    """(name, our network, their network, our input, their input): the same random weights on both sides."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.open_pose.model import bodypose_model
    from controlnet_aux.pidi.model import pidinet
    from factories import randomize_

    from annotators.base import fold_batch_norms, inference_network
    from annotators.hed import ControlNetHED
    from annotators.lineart import LineartGenerator
    from annotators.mlsd import MLSDLarge
    from annotators.openpose import BodyPoseNet
    from annotators.pidinet import PiDiNet

    def pair(ours_cls, theirs, channels, scale=1.0, fold=False, size=512):
        ours = randomize_(ours_cls(), 0).eval()
        theirs.load_state_dict(ours.state_dict())
        if fold:
            fold_batch_norms(ours)
        x = torch.rand(1, channels, size, size) * scale
        return inference_network(ours), theirs.eval(), x.contiguous(memory_format=torch.channels_last), x

    yield ("HED", *pair(ControlNetHED, ControlNetHED_Apache2(), 3, 255.0))
    yield ("PiDiNet", *pair(PiDiNet, pidinet(), 3))
    yield ("M-LSD large", *pair(MLSDLarge, MobileV2_MLSD_Large(), 4, fold=True))
    yield ("lineart", *pair(LineartGenerator, Generator(3, 1, 3), 3))
    # the body network sees 0.5 * 368 px of a 512 px image (the reference's one scale): 184 x 184
    yield ("OpenPose body", *pair(BodyPoseNet, bodypose_model(), 3, size=184))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = gemm_gflops(args.reps)
    print(f"# networks for one 512x512 image, float32, best of {args.reps}; {machine()}")
    print(f"float32 4096x4096 matmul: {peak:.0f} GFLOP/s (the ceiling below)")
    for name, ours, theirs, x_ours, x_theirs in networks():
        n = flops(theirs, x_theirs)
        with torch.inference_mode():
            t = alternate({"ours": lambda ours=ours, x=x_ours: ours(x), "theirs": lambda theirs=theirs, x=x_theirs: theirs(x)}, args.reps, stat=min)
        t_o, t_t = t["ours"], t["theirs"]
        print(f"{name:14} {n / 1e9:6.1f} GFLOP  ours {t_o * 1000:7.1f} ms = {n / t_o / 1e9:4.0f} GFLOP/s ({n / t_o / 1e9 / peak:4.0%} of the ceiling)"
              f"  controlnet-aux {t_t * 1000:7.1f} ms = {n / t_t / 1e9:4.0f} GFLOP/s ({n / t_t / 1e9 / peak:4.0%})  network speed-up {t_t / t_o:.2f}x")


if __name__ == "__main__":
    main()
