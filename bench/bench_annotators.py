"""Per-image annotator time on a 512x512 batch of 8: ours vs controlnet-aux on the same random weights and images,
and our Canny vs raw OpenCV. Ratios are printed as peer time / our time (higher = we are faster).

    .venv/bin/python bench/bench_annotators.py [--reps 3]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from common import alternate, machine

N, SIZE = 8, 512


def images():
    rng = np.random.default_rng(0)
    imgs = [cv2.GaussianBlur(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), (0, 0), 3) for _ in range(N)]
    batch = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    return imgs, batch


def bench_canny(reps: int) -> dict[str, float]:
    """Seconds for the batch: ours on ComfyUI's float IMAGE layout and on uint8, raw cv2.Canny image by image on
    uint8, and raw cv2.Canny after the float->uint8 conversion a cv2 user holding float images has to do."""
    from annotators import registry

    imgs, batch = images()
    u8 = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)  # channels-last uint8, as from numpy/PIL
    floats = [b.permute(1, 2, 0).numpy() for b in batch]
    ours = registry.load("canny")
    return alternate({
        "ours float IMAGE": lambda: ours(batch, resolution=SIZE, low_threshold=100, high_threshold=200),
        "ours uint8": lambda: ours(u8, resolution=SIZE, low_threshold=100, high_threshold=200),
        "cv2.Canny uint8": lambda: [cv2.Canny(i, 100, 200) for i in imgs],
        "cv2 float->uint8 + Canny": lambda: [cv2.Canny((f * 255 + 0.5).clip(0, 255).astype(np.uint8), 100, 200) for f in floats],
    }, reps, stat=min)  # interleaved, best of the rounds


def _rand(module: torch.nn.Module) -> torch.nn.Module:
    from factories import randomize_

    return randomize_(module, 0).eval()


DEV = torch.device("cpu")
DTYPES = ["float32"]  # our precisions; controlnet-aux always runs float32
CHUNK = None  # images per network call for ours; None: the library's default for the device (CPU 1, GPU 8)


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _pair(make_ours, theirs_call, imgs, batch, reps, **ours_kw):
    """({dtype name: our batched time}, their per-image loop time in float32) on the same images.

    Interleaved (`common.alternate`: ours in each dtype, then theirs, `reps` rounds after one warm-up each), best of the
    rounds: on a shared machine a slow spell then hits both sides alike instead of whichever happened to run during it."""
    b = batch.to(DEV)
    runs = {name: (lambda det: lambda: det(b, chunk_size=CHUNK, **ours_kw))(make_ours(getattr(torch, name))) for name in DTYPES}
    runs["theirs"] = lambda: [theirs_call(i) for i in imgs]
    t = alternate(runs, reps, sync=_sync, stat=min)
    return {name: t[name] for name in DTYPES}, t["theirs"]


def hed(d, imgs, batch, reps):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    from annotators.hed import ControlNetHED, HEDDetector

    sd = _rand(ControlNetHED()).state_dict()
    torch.save(sd, d / "ControlNetHED.pth")
    net = ControlNetHED_Apache2()
    net.load_state_dict(sd)
    theirs = HEDdetector(net.float().eval()).to(DEV)
    return _pair(lambda dt: HEDDetector.from_file(d / "ControlNetHED.pth", device=DEV, dtype=dt), lambda i: theirs(i, detect_resolution=SIZE, image_resolution=SIZE, output_type="np"),
                 imgs, batch, reps, resolution=SIZE)


def pidinet(d, imgs, batch, reps):
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet as their_pidinet

    from annotators.pidinet import PiDiNet, PiDiNetDetector

    sd = _rand(PiDiNet()).state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, d / "table5_pidinet.pth")
    net = their_pidinet()
    net.load_state_dict(sd)
    theirs = PidiNetDetector(net.eval()).to(DEV)
    return _pair(lambda dt: PiDiNetDetector.from_file(d / "table5_pidinet.pth", device=DEV, dtype=dt), lambda i: theirs(i, detect_resolution=SIZE, image_resolution=SIZE, output_type="np"),
                 imgs, batch, reps, resolution=SIZE)


def mlsd(d, imgs, batch, reps):
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    from annotators.mlsd import MLSDDetector, MLSDLarge

    sd = _rand(MLSDLarge()).state_dict()
    torch.save(sd, d / "mlsd_large_512_fp32.pth")
    net = MobileV2_MLSD_Large()
    net.load_state_dict(sd)
    theirs = MLSDdetector(net.eval()).to(DEV)
    return _pair(lambda dt: MLSDDetector.from_file(d / "mlsd_large_512_fp32.pth", device=DEV, dtype=dt), lambda i: theirs(i, detect_resolution=SIZE, image_resolution=SIZE, output_type="np"),
                 imgs, batch, reps, resolution=SIZE)


def lineart(d, imgs, batch, reps):
    from controlnet_aux.lineart import Generator
    from controlnet_aux.lineart import LineartDetector as TheirLineart

    from annotators.lineart import LineartDetector, LineartGenerator

    sd = _rand(LineartGenerator()).state_dict()
    torch.save(sd, d / "sk_model.pth")
    net = Generator(3, 1, 3)
    net.load_state_dict(sd)
    theirs = TheirLineart(net.eval(), net).to(DEV)
    return _pair(lambda dt: LineartDetector.from_file(d / "sk_model.pth", device=DEV, dtype=dt), lambda i: theirs(i, detect_resolution=SIZE, image_resolution=SIZE, output_type="np"),
                 imgs, batch, reps, resolution=SIZE)


def openpose_body(d, imgs, batch, reps):
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    from annotators.openpose import BodyPoseNet, OpenPoseDetector

    sd = _rand(BodyPoseNet()).state_dict()
    torch.save({k.split(".", 1)[1]: v for k, v in sd.items()}, d / "body_pose_model.pth")
    theirs = OpenposeDetector(Body(str(d / "body_pose_model.pth")))  # Body moves itself to CUDA when there is one
    return _pair(lambda dt: OpenPoseDetector.from_file(d / "body_pose_model.pth", device=DEV, dtype=dt),
                 lambda i: theirs(i, detect_resolution=SIZE, image_resolution=SIZE, include_body=True, include_hand=False, include_face=False, output_type="np"),
                 imgs, batch, reps, resolution=SIZE, include_body=True, include_hand=False, include_face=False)


NEURAL = {"hed": hed, "pidinet": pidinet, "mlsd": mlsd, "lineart": lineart, "openpose body": openpose_body}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="run only these neural annotators")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], help="our precisions to time (torch dtype names)")
    ap.add_argument("--chunk", type=int, default=None, help="images per network call for ours (default: the library's, CPU 1, GPU 8)")
    args = ap.parse_args()
    global DEV, DTYPES, CHUNK
    DEV, DTYPES, CHUNK = torch.device(args.device), args.dtypes, args.chunk
    torch.manual_seed(0)
    from annotators.base import default_chunk_size

    chunk = CHUNK or default_chunk_size(DEV)
    print(f"# annotators, {N} images {SIZE}x{SIZE}, per-image ms (best of {args.reps}), ours {chunk} image(s) per call; {machine()}")
    c = bench_canny(args.reps)
    print("canny        " + "  ".join(f"{k} {v / N * 1000:.2f}" for k, v in c.items()))
    print(f"canny        ours/raw: float IMAGE vs cv2.Canny uint8 {c['ours float IMAGE'] / c['cv2.Canny uint8']:.2f}x, "
          f"float IMAGE vs cv2 float->uint8 + Canny {c['ours float IMAGE'] / c['cv2 float->uint8 + Canny']:.2f}x, "
          f"uint8 vs cv2.Canny uint8 {c['ours uint8'] / c['cv2.Canny uint8']:.2f}x  (lower = we are faster)")
    imgs, batch = images()
    with tempfile.TemporaryDirectory() as d:
        for key, fn in NEURAL.items():
            if args.only and key not in args.only:
                continue
            try:
                o, t = fn(Path(d), imgs, batch, args.reps)
            except Exception as e:  # noqa: BLE001 - a missing annotator is reported, the others still run
                print(f"{key:12} skipped: {type(e).__name__}: {e}")
                continue
            ours = "  ".join(f"ours {k} {v / N * 1000:8.1f} ({t / v:.2f}x)" for k, v in o.items())
            print(f"{key:12} controlnet-aux float32 {t / N * 1000:8.1f}  {ours}   (speed-up = their time / ours)")


if __name__ == "__main__":
    main()
