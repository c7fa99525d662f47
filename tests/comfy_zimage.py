"""A tiny Z-Image base and ComfyUI's own Z-Image Fun ControlNet patch at the same tiny width, built in-process.

Why not files through the host's loaders: ComfyUI recognises Z-Image by its width (3840: 30 heads of 128, the rotary
axes, the modulation are fixed there), and its ModelPatchLoader builds `ZImage_Control` at its default width 3840
whatever the file says. So the classes those loaders build are built directly: `supported_models.ZImage` ->
`model_base.Lumina2` -> `ldm.lumina.model.NextDiT` with Z-Image's settings (z_image modulation, pad tokens to 32,
time scale 1000, rope theta 256) at width 256 (the narrowest its modulation allows: the timestep embedding is 256
wide whatever the width), 2 heads of 128 with Z-Image's rotary axes (32, 48, 48), 16 main blocks and 2 refiner
blocks; a 16-channel TAESD as `sd.VAE` (Z-Image samples in the Flux VAE's latent space); and, on hosts that have it,
`ldm.lumina.controlnet.ZImage_Control` filled through the host's own `z_image_convert` from the very file our loader
reads, with ModelPatchLoader's settings (its 2.0 `broken` flag from the zero refiner weight included).

Control files have 2 control layers, so ComfyUI's rule `round(30 / 2) = 15` puts them after main blocks 0 and 15 of
the 16: both run in every forward (the host's patch keeps state between forwards unless its last layer runs).
"""
from __future__ import annotations

from pathlib import Path

import torch
from factories import randomize_, save

WIDTH, HEADS, AXES, CONTEXT, BLOCKS, CONTROL_LAYERS = 256, 2, (32, 48, 48), 32, 16, 2
FFN = int(WIDTH / 3 * 8)  # the published files' feed-forward width rule (ComfyUI: multiple_of 1 for its control)


def tiny_zimage(seed: int = 60) -> dict:
    """{'model': ModelPatcher, 'vae': VAE}: a 16 + 2 block Z-Image base and a 16-channel TAESD."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": WIDTH, "cap_feat_dim": CONTEXT, "n_layers": BLOCKS,
              "qk_norm": True, "n_heads": HEADS, "n_kv_heads": HEADS, "axes_dims": list(AXES), "axes_lens": [1536, 512, 512],
              "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
              "pad_tokens_multiple": 32}
    with torch.no_grad():
        base = comfy.supported_models.ZImage(config).get_model({})
    randomize_(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    vae = comfy.sd.VAE(sd=randomize_(comfy.taesd.taesd.TAESD(latent_channels=16), seed + 1).state_dict())
    return {"model": model, "vae": vae}


def zimage_fun_file(path: Path, version: str, seed: int = 61) -> Path:
    """A random-weight file of the published layout: version "1" (16-channel hint), "2.1" (33, refiner control) or
    "2.0" (2.1's layout with the published file's all-zero refiner `after_proj`)."""
    from controlnet_core.zimage import ZImageFunConfig, ZImageFunControlNet

    two = version != "1"
    cfg = ZImageFunConfig(dim=WIDTH, head_dim=WIDTH // HEADS, ffn_dim=FFN, adaln_dim=min(WIDTH, 256), hint_channels=33 if two else 16,
                          num_control_layers=CONTROL_LAYERS, refiner_control=two)
    sd = randomize_(ZImageFunControlNet(cfg), seed).state_dict()
    if version == "2.0":
        sd["control_noise_refiner.0.after_proj.weight"] = torch.zeros_like(sd["control_noise_refiner.0.after_proj.weight"])
    return save(path, sd)


def has_host_zimage_control() -> bool:
    import importlib

    try:
        importlib.import_module("comfy.ldm.lumina.controlnet")
        patches = importlib.import_module("comfy_extras.nodes_model_patch")
    except ImportError:
        return False
    return hasattr(patches, "ZImageControlPatch") and hasattr(patches, "z_image_convert")


def host_patch(path: Path):
    """ComfyUI's MODEL_PATCH for the file, as its ModelPatcher loader makes it (at the tiny width)."""
    import comfy.ldm.lumina.controlnet
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    from comfy_extras.nodes_model_patch import z_image_convert
    from safetensors.torch import load_file

    sd = z_image_convert(load_file(str(path)))
    config = {"n_control_layers": sum(1 for k in sd if k.startswith("control_layers.") and k.endswith(".adaLN_modulation.0.weight"))}
    if "control_noise_refiner.0.after_proj.weight" in sd:
        config.update(additional_in_dim=17, refiner_control=True, broken=bool(torch.count_nonzero(sd["control_noise_refiner.0.after_proj.weight"]) == 0))
    net = comfy.ldm.lumina.controlnet.ZImage_Control(dim=WIDTH, n_heads=HEADS, n_kv_heads=HEADS, multiple_of=1, operations=comfy.ops.manual_cast,
                                                     **config)
    net.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
