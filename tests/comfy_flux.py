"""A tiny Flux.1 base and ComfyUI's own Flux ControlNet objects at the same tiny width, built in-process.

Why not files through CheckpointLoaderSimple / ControlNetLoader: ComfyUI recognises Flux only at full width (its
detection fixes 24 heads of 128, so even a 1+1-block base is 530 M parameters). So the classes ComfyUI's loaders would
build are built directly at width 128 (2 heads of 64): `supported_models.Flux` -> `model_base.Flux`, a 16-channel TAESD
as `sd.VAE`, and `controlnet.ControlNet` around `ldm.flux.controlnet.ControlNetFlux` filled from the very file our
loader reads, with the host's own key conversion and the settings of its `load_controlnet_flux_*` functions. The
test nodes `SuiteTestProvided` / `SuiteTestProvidedControlNet` hand them to a prompt.
"""
from __future__ import annotations

from pathlib import Path

import torch
from factories import randomize_, save

WIDTH, HEADS, AXES, CONTEXT, POOLED = 128, 2, [8, 28, 28], 96, 80


def params(double: int, single: int, guidance: bool = True) -> dict:
    import dataclasses

    import comfy.ldm.flux.model

    out = dict(in_channels=16, out_channels=16, vec_in_dim=POOLED, context_in_dim=CONTEXT, hidden_size=WIDTH, mlp_ratio=4.0,
               num_heads=HEADS, depth=double, depth_single_blocks=single, axes_dim=list(AXES), theta=10000, patch_size=2,
               qkv_bias=True, guidance_embed=guidance)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        out["txt_ids_dims"] = []  # ComfyUI 0.8.0 and later: what its detection sets for Flux.1
    return out


def tiny_flux(seed: int = 30) -> dict:
    """{'model': ModelPatcher, 'vae': VAE}: a 2 double + 2 single block Flux dev-like base (guidance embedded)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    with torch.no_grad():
        base = comfy.supported_models.Flux({"image_model": "flux", **params(2, 2)}).get_model({})
    randomize_(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    vae = comfy.sd.VAE(sd=randomize_(comfy.taesd.taesd.TAESD(latent_channels=16), seed + 1).state_dict())
    return {"model": model, "vae": vae}


def instantx_file(path: Path, *, inpaint: bool = False, modes: int = 0, seed: int = 31) -> Path:
    """A random-weight InstantX-layout (diffusers key names) Flux ControlNet of the tiny width: 2 double, 1 single block."""
    from controlnet_core.flux import FluxControlNetConfig, build_flux_controlnet

    cfg = FluxControlNetConfig(layout="instantx", hidden_size=WIDTH, head_dim=64, num_layers=2, num_single_layers=1,
                               hint_channels=68 if inpaint else 64, pooled_projection_dim=POOLED, joint_attention_dim=CONTEXT,
                               mlp_hidden_dim=4 * WIDTH, guidance_embeds=True, num_modes=modes, axes_dims_rope=tuple(AXES))
    return save(path, randomize_(build_flux_controlnet(cfg), seed).state_dict())


def xlabs_file(path: Path, seed: int = 32) -> Path:
    """An XLabs-layout file: ComfyUI's own class (random weights) saved under its key names, 2 double blocks."""
    import comfy.ldm.flux.controlnet
    import comfy.ops

    model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu", **params(2, 0))
    return save(path, randomize_(model, seed).state_dict())


def host_control(path: Path):
    """ComfyUI's ControlNet object for the file, as its loader builds it at full width (see the module doc). An fp8
    file is held as the loader holds it (controlnet_config): fp8 weights, ComfyUI's manual-cast operations computing in
    the host's cast dtype for the device."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.flux.controlnet
    import comfy.model_detection
    import comfy.model_management
    import comfy.ops
    import comfy.utils
    from safetensors.torch import load_file

    sd = load_file(str(path))
    weight_dtype = comfy.utils.weight_dtype(sd)
    dtype, cast, ops = torch.float32, None, comfy.ops.disable_weight_init
    if weight_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        dtype, cast = weight_dtype, comfy.model_management.unet_manual_cast(weight_dtype, torch.device("cpu"))
        ops = comfy.ops.pick_operations(dtype, cast, disable_fast_fp8=True)
    if "controlnet_x_embedder.weight" in sd:  # load_controlnet_flux_instantx
        new = comfy.model_detection.convert_diffusers_mmdit(dict(sd), "")
        for k, v in sd.items():
            new.setdefault(k, v)
        modes = new["controlnet_mode_embedder.weight"].shape[0] if "controlnet_mode_embedder.weight" in new else 0
        channels = new["pos_embed_input.weight"].shape[1] // 4
        double = sum(1 for k in sd if k.startswith("transformer_blocks.") and k.endswith(".norm1.linear.weight"))
        single = sum(1 for k in sd if k.startswith("single_transformer_blocks.") and k.endswith(".norm.linear.weight"))
        net = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, num_union_modes=modes, control_latent_channels=channels,
                                                      operations=ops, dtype=dtype, device="cpu", **params(double, single))
        net.load_state_dict({k: v for k, v in new.items() if k in net.state_dict()}, strict=True)
        return comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=comfy.latent_formats.Flux(), concat_mask=channels == 17,
                                           load_device=torch.device("cpu"), manual_cast_dtype=cast, extra_conds=["y", "guidance"])
    # load_controlnet_flux_xlabs_mistoline
    double = sum(1 for k in sd if k.startswith("double_blocks.") and k.endswith(".img_attn.qkv.weight"))
    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=ops, dtype=dtype, device="cpu", **params(double, 0))
    net.load_state_dict(sd, strict=True)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"), manual_cast_dtype=cast, extra_conds=["y", "guidance"])
