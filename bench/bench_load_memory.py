"""Peak resident memory while loading a full-size SD1.5 ControlNet (random weights, fp32 safetensors).

Each loader runs in its own fresh process; the kernel's own accounting (VmHWM, VmRSS) is read.
Goal: ours peaks at <= 1.3x the tensor bytes. Peers: ComfyUI's `load_controlnet` and
`safetensors.torch.load_file` + `load_state_dict` on the same file.

    .venv/bin/python bench/bench_load_memory.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, proc_status_kib


def load_ours(path: Path) -> int:
    baseline = proc_status_kib("VmRSS")
    import torch

    from controlnet_core import load_control

    load_control(path, dtype=torch.float32)
    return baseline


def load_comfy(path: Path) -> int:
    from comfy_host import import_comfy

    import_comfy()
    import comfy.controlnet

    baseline = proc_status_kib("VmRSS")  # after the host's own imports, which are not the loader's cost
    comfy.controlnet.load_controlnet(str(path))
    return baseline


def load_safetensors(path: Path) -> int:
    baseline = proc_status_kib("VmRSS")
    from safetensors.torch import load_file

    from controlnet_core import ControlNet, ControlNetConfig

    ControlNet(ControlNetConfig()).load_state_dict(load_file(str(path)))
    return baseline


MEASURE = {"ours": load_ours, "comfy": load_comfy, "safetensors.load_file": load_safetensors}


def measure(method: str, path: str) -> None:
    import torch  # noqa: F401  (imported before the baseline, as every loader needs it)

    baseline = MEASURE[method](Path(path))
    print(json.dumps({"baseline_kib": baseline, "peak_kib": proc_status_kib("VmHWM"), "after_kib": proc_status_kib("VmRSS")}))


def main() -> None:
    import torch
    from factories import SD15, random_controlnet, save

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "control_sd15_random_fp32.safetensors"
        model = random_controlnet(SD15)
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        save(path, model.state_dict())
        del model
        print(f"# load memory, full SD1.5 ControlNet fp32 ({nbytes / 2**30:.3f} GiB of tensors); {machine()}")
        print(f"{'loader':24} {'peak-baseline':>14} {'ratio':>7} {'peak total':>11} {'ratio':>7}")
        rows = {}
        for method in MEASURE:
            out = subprocess.run([sys.executable, __file__, "--measure", method, str(path)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{method:24} failed: {out.stderr[-400:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            delta = (r["peak_kib"] - r["baseline_kib"]) * 1024
            rows[method] = delta / nbytes
            print(f"{method:24} {delta / 2**30:11.3f} GiB {delta / nbytes:6.2f}x {r['peak_kib'] * 1024 / 2**30:8.3f} GiB {r['peak_kib'] * 1024 / nbytes:6.2f}x")
        if "ours" in rows and "comfy" in rows:
            print(f"ours / comfy peak-over-baseline: {rows['ours'] / rows['comfy']:.2f}x")
    del torch


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3])
    else:
        main()
