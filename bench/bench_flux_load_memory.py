"""Peak resident memory while loading a full-size Flux (or Qwen-Image, or Z-Image Fun) ControlNet (random weights), fp8 and bf16.

Default shape: InstantX's published Flux.1-dev canny / depth ControlNets, 5 double + 10 single blocks of width 3072
with the guidance embedding (3.30 G parameters: 3.3 GB in float8_e4m3fn, 6.6 GB in bfloat16). The files are written
tensor by tensor (tests/fullsize_flux.py), one at a time, each removed after its cases, so the disk holds at most the
bf16 one. Every case loads the file in a fresh process and reads the kernel's own accounting: baseline = VmRSS after
the imports the loader needs (torch, and ComfyUI for its loader), peak = VmHWM. Reported: (peak - baseline) / the
tensor bytes of the model the loader returns (goal <= 1.1x), and the peak total.

Cases: ours (`load_control`, compute dtype bf16: the default for fp8 files, the stored dtype for bf16 ones) and
ComfyUI's own `load_controlnet` on the same file asked for the same compute dtype (`model_options={"dtype": bf16}`).
`--comfy-default` adds ComfyUI with its own dtype choice (on the CPU: fp8 files stay fp8 and are cast per layer at run
time; bf16 files are upcast to fp32, twice the tensor bytes). `--keep-fp8` adds ours as the loader node loads (fp8
weights kept in fp8, `keep_fp8=True`) and ComfyUI's own choice beside it, on the fp8 file; `--stored fp8` skips the
bf16 file.

`--family qwen`: InstantX's published Qwen-Image ControlNet shape instead (5 blocks of 3072, text width 3584; 1.2 G
parameters), which ComfyUI's own loader detects at this width too.

`--family zimage`: alibaba-pai's published Z-Image Fun ControlNet union 2.1 shape (15 control layers + 2 refiner-control
layers of width 3840, 33-channel hint; 3.1 G parameters). It is a model patch: ComfyUI's peer is its own
`ModelPatchLoader` node (0.8.0 and later, `COMFYUI_PATH`), which keeps the file's dtype and casts per layer, so it is
compared with ours keeping fp8 (`--keep-fp8`) and with ours in the stored dtype for bf16. `--blocks` sets the control
layers (15: 2.x; 6 with `--version 1`).

    .venv/bin/python bench/bench_flux_load_memory.py [--double 5 --single 10] [--comfy-default] [--keep-fp8] [--stored fp8]
    .venv/bin/python bench/bench_flux_load_memory.py --family qwen [--blocks 5] ...
    COMFYUI_PATH=... .venv-new/bin/python bench/bench_flux_load_memory.py --family zimage [--version 1] --keep-fp8 ...
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, proc_status_kib

DTYPES = {"fp8": "float8_e4m3fn", "bf16": "bfloat16", "fp32": "float32"}


def _model_bytes(module) -> int:
    """Tensor bytes of a module's parameters and buffers, each storage once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _dtypes(module) -> list[str]:
    return sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()})


def measure(method: str, path: str, dtype: str) -> None:
    """In a fresh process: load once, print one JSON line."""
    import torch

    if method == "ours":
        from controlnet_core import load_control

        baseline = proc_status_kib("VmRSS")
        t0 = time.perf_counter()
        model = load_control(path, dtype=getattr(torch, DTYPES[dtype]) if dtype != "default" else None).model
    elif method == "ours-keep":
        from controlnet_core import load_control

        baseline = proc_status_kib("VmRSS")
        t0 = time.perf_counter()
        model = load_control(path, dtype=torch.bfloat16, keep_fp8=True).model
    elif method == "comfy-patch":  # the host's ModelPatchLoader node, on the file as a user's models/model_patches holds it
        from comfy_host import import_comfy

        import_comfy()
        import comfy.model_patcher  # noqa: F401  (the node module uses it without importing it; ComfyUI's start-up does)
        import folder_paths
        from comfy_extras.nodes_model_patch import ModelPatchLoader

        folder_paths.add_model_folder_path("model_patches", str(Path(path).parent))
        baseline = proc_status_kib("VmRSS")
        t0 = time.perf_counter()
        model = ModelPatchLoader().load_model_patch(Path(path).name)[0].model
    else:
        from comfy_host import import_comfy

        import_comfy()
        import comfy.controlnet

        baseline = proc_status_kib("VmRSS")  # after the host's own imports, which are not the loader's cost
        options = {} if dtype == "default" else {"dtype": getattr(torch, DTYPES[dtype])}
        t0 = time.perf_counter()
        model = comfy.controlnet.load_controlnet(path, model_options=options).control_model
    seconds = time.perf_counter() - t0
    gc.collect()
    print(json.dumps({"baseline_kib": baseline, "peak_kib": proc_status_kib("VmHWM"), "after_kib": proc_status_kib("VmRSS"),
                      "tensor_bytes": _model_bytes(model), "dtypes": _dtypes(model), "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["flux", "qwen", "zimage"], default="flux")
    ap.add_argument("--blocks", type=int, default=None, help="Qwen-Image: ControlNet blocks (5); Z-Image: control layers (15, v1: 6)")
    ap.add_argument("--version", choices=["1", "2.1"], default="2.1", help="Z-Image Fun ControlNet version")
    ap.add_argument("--double", type=int, default=5)
    ap.add_argument("--single", type=int, default=10)
    ap.add_argument("--comfy-default", action="store_true", help="also ComfyUI with its own dtype choice")
    ap.add_argument("--keep-fp8", action="store_true", help="also ours keeping fp8 weights, beside ComfyUI's own choice")
    ap.add_argument("--stored", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    args = ap.parse_args()

    import torch
    from fullsize_flux import full_width_config, random_tensor, shapes_of, write_safetensors

    if args.family == "flux":
        shapes = shapes_of(full_width_config("instantx", args.double, args.single))
        what, stem = f"Flux InstantX ControlNet, {args.double} double + {args.single} single blocks", f"flux_instantx_{args.double}d{args.single}s"
    elif args.family == "qwen":
        from controlnet_core.qwen import QwenControlNetConfig, build_qwen_controlnet

        blocks = args.blocks or 5
        with torch.device("meta"):
            model = build_qwen_controlnet(QwenControlNetConfig(num_layers=blocks))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        what, stem = f"Qwen-Image InstantX ControlNet, {blocks} blocks", f"qwen_instantx_{blocks}"
    else:
        from controlnet_core.zimage import ZImageFunConfig, ZImageFunControlNet

        v2 = args.version != "1"
        layers = args.blocks or (15 if v2 else 6)
        config = ZImageFunConfig(num_control_layers=layers, hint_channels=33 if v2 else 16, refiner_control=v2)
        with torch.device("meta"):
            model = ZImageFunControlNet(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        what, stem = f"Z-Image Fun ControlNet union {args.version}, {layers} control layers", f"zimage_fun_{args.version}_{layers}"
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"# load memory, full-size {what}, {params / 1e9:.2f} G parameters, random weights; {machine()}")
    print(f"{'file':5} {'loader':11} {'loaded as':15} {'peak-baseline':>14} {'/ tensor bytes':>15} {'peak total':>11} {'load s':>7}")
    peer = "comfy-patch" if args.family == "zimage" else "comfy"  # a model patch: ComfyUI loads it with ModelPatchLoader
    cases = [("ours", "default")] + ([] if peer == "comfy-patch" else [("comfy", "bf16")]) + ([("comfy", "default")] if args.comfy_default else [])
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for stored in args.stored:
            path = Path(d) / f"{stem}_{stored}.safetensors"
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(50)
            write_safetensors(path, shapes, getattr(torch, DTYPES[stored]), lambda name, shape, g=g: random_tensor(name, shape, g))
            print(f"# wrote {path.name}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
            ratios = {}
            keep = [("ours-keep", "default"), (peer, "default")] if args.keep_fp8 and stored == "fp8" else []
            if peer == "comfy-patch" and stored == "bf16":
                keep = [(peer, "default")]
            for method, dtype in cases + [c for c in keep if c not in cases]:
                out = subprocess.run([sys.executable, __file__, "--measure", method, str(path), dtype], capture_output=True, text=True, cwd=ROOT)
                label = f"{method}" + ("" if method.startswith("ours") or method == "comfy-patch" or dtype == "bf16" else " (own)")
                if out.returncode != 0:
                    print(f"{stored:5} {label:11} failed (exit {out.returncode}): {out.stderr[-300:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                delta = (r["peak_kib"] - r["baseline_kib"]) * 1024
                ratio = delta / r["tensor_bytes"]
                ratios[(method, dtype)] = ratio
                print(f"{stored:5} {label:11} {'/'.join(r['dtypes']):15} {delta / 2**30:10.2f} GiB {ratio:14.2f}x "
                      f"{r['peak_kib'] / 2**20:7.2f} GiB {r['seconds']:7.1f}   (tensors {r['tensor_bytes'] / 2**30:.2f} GiB, "
                      f"baseline {r['baseline_kib'] / 2**20:.2f} GiB)")
            if ("ours", "default") in ratios and ("comfy", "bf16") in ratios:
                print(f"{stored:5} ours / ComfyUI (same dtype), peak over baseline per tensor byte: "
                      f"{ratios[('ours', 'default')] / ratios[('comfy', 'bf16')]:.2f}x")
            if ("ours-keep", "default") in ratios and (peer, "default") in ratios:
                print(f"{stored:5} ours kept fp8 / ComfyUI's own fp8 handling, peak over baseline per tensor byte: "
                      f"{ratios[('ours-keep', 'default')] / ratios[(peer, 'default')]:.2f}x")
            if peer == "comfy-patch" and stored == "bf16" and ("ours", "default") in ratios and (peer, "default") in ratios:
                print(f"{stored:5} ours / ComfyUI's ModelPatchLoader (both bf16), peak over baseline per tensor byte: "
                      f"{ratios[('ours', 'default')] / ratios[(peer, 'default')]:.2f}x")
            path.unlink()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
