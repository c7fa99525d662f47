"""GPU parity check (fp32/fp16/bf16): ours vs ComfyUI's cldm and vs diffusers, full SD1.5 shapes, random weights.

Run on a CUDA machine; prints relative errors of every residual against an fp64 CPU reference of
the same weights, for ours and for each peer in the same dtype, so low-precision error can be judged
against what the reference implementations themselves produce.

    python bench/gpu_check.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import machine


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="scaled-down model at 64 px, to check the script itself on a CPU")
    args = ap.parse_args()
    from comfy_host import import_comfy

    import_comfy(cpu=not torch.cuda.is_available())
    import comfy.controlnet
    import diffusers
    from factories import SD15, SD15_320, comfy_control_outputs, inputs, random_controlnet, rel_err, save

    from controlnet_core import load_control, save_diffusers

    cfg, latent = (SD15_320, 8) if args.smoke else (SD15, 64)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# GPU parity, SD1.5 full shapes, 512 px, batch 2; {machine()}")
    with tempfile.TemporaryDirectory() as d:
        path = save(Path(d) / "control_sd15_random.safetensors", random_controlnet(cfg).state_dict())
        x, hint, t, ctx, _ = inputs(cfg, batch=2, latent=latent, tokens=77)
        ref_model = load_control(path, dtype=torch.float64).model
        with torch.no_grad():
            ref = ref_model(x.double(), hint.double(), t.double(), ctx.double())
        del ref_model
        folder = save_diffusers(load_control(path), Path(d) / "diffusers")
        for name, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            a = [v.to(dev, dt) for v in (x, hint, t, ctx)]
            ours = load_control(path, dtype=dt, device=dev).model
            comfy_model = comfy.controlnet.load_controlnet(str(path)).control_model.to(dev, dt)
            diff_model = diffusers.ControlNetModel.from_pretrained(folder, torch_dtype=dt).to(dev).eval()
            with torch.no_grad():
                r_ours = ours(*a)
                c_down, c_mid = comfy_control_outputs(comfy_model, *a, None)
                d_down, d_mid = diff_model(a[0], a[2], encoder_hidden_states=a[3], controlnet_cond=a[1], return_dict=False)
            rows = {
                "ours": [*r_ours.down, r_ours.mid],
                "comfy cldm": [*c_down, c_mid],
                "diffusers": [*d_down, d_mid],
            }
            refs = [*ref.down, ref.mid]
            print(f"[{name}] max / mean relative error of the {len(refs)} residuals vs fp64 reference")
            for k, outs in rows.items():
                errs = [rel_err(o.cpu(), r) for o, r in zip(outs, refs)]
                print(f"  {k:11} max {max(errs):.2e}  mean {sum(errs) / len(errs):.2e}")
            e_oc = max(rel_err(o.cpu(), c.cpu()) for o, c in zip(rows["ours"], rows["comfy cldm"]))
            e_od = max(rel_err(o.cpu(), c.cpu()) for o, c in zip(rows["ours"], rows["diffusers"]))
            print(f"  ours vs comfy max {e_oc:.2e}; ours vs diffusers max {e_od:.2e}")
            del ours, comfy_model, diff_model
            torch.cuda.empty_cache() if dev.type == "cuda" else None


if __name__ == "__main__":
    main()
