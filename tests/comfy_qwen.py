"""A tiny Qwen-Image base and ComfyUI's own Qwen-Image ControlNet objects at the same tiny width, built in-process.

Why not files through the host's loaders: ComfyUI's Qwen-Image detection reads only the block count and takes the rest
from its class defaults (width 3072, text width 3584), so a 1-block base is already 1.5 GB in fp32. So the classes its
loaders build are built directly at width 128: `supported_models.QwenImage` -> `model_base.QwenImage`, a Wan 2.1 VAE of
width 8 as `sd.VAE` (one-frame 5-D latents, as the host samples Qwen-Image), and `controlnet.ControlNet` around
`ldm.qwen_image.controlnet.QwenImageControlNetModel` filled from the very file our loader reads, with the settings of
the host's `load_controlnet_qwen_instantx` (Wan 2.1 latent format, keep mask for 68-feature files, no extra conds).
"""
from __future__ import annotations

from pathlib import Path

import torch
from factories import randomize_, save

WIDTH, HEADS, HEAD_DIM, AXES, CONTEXT = 128, 2, 64, (8, 28, 28), 32
SIZES = dict(attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CONTEXT, axes_dims_rope=AXES)


def tiny_qwen(seed: int = 40) -> dict:
    """{'model': ModelPatcher, 'vae': VAE}: a 2-block Qwen-Image base."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    with torch.no_grad():
        base = comfy.supported_models.QwenImage({"image_model": "qwen_image", "num_layers": 2, **SIZES}).get_model({})
    randomize_(base.diffusion_model, seed)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    vae = comfy.sd.VAE(sd=tiny_wan21_vae(seed + 1))
    return {"model": model, "vae": vae}


def tiny_wan21_vae(seed: int) -> dict:
    """Qwen-Image's VAE family (Wan 2.1: 16 channels, one-frame 5-D latents) at width 8; ComfyUI reads the width from
    `decoder.head.0.gamma`, so its VAE loader builds this very shape."""
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
                                   dropout=0.0)
    return randomize_(vae, seed).state_dict()


def instantx_file(path: Path, *, blocks: int = 2, inpaint: bool = False, seed: int = 41) -> Path:
    """A random-weight InstantX-layout (diffusers key names) Qwen-Image ControlNet of the tiny width."""
    from controlnet_core.qwen import QwenControlNetConfig, build_qwen_controlnet

    cfg = QwenControlNetConfig(hidden_size=WIDTH, head_dim=HEAD_DIM, num_layers=blocks, hint_channels=68 if inpaint else 64,
                               joint_attention_dim=CONTEXT, mlp_hidden_dim=4 * WIDTH, axes_dims_rope=AXES)
    return save(path, randomize_(build_qwen_controlnet(cfg), seed).state_dict())


def host_control(path: Path):
    """ComfyUI's ControlNet object for the file, as `load_controlnet_qwen_instantx` builds it at full width."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.qwen_image.controlnet
    import comfy.ops
    from safetensors.torch import load_file

    sd = load_file(str(path))
    channels = sd["controlnet_x_embedder.weight"].shape[1]
    blocks = sum(1 for k in sd if k.startswith("controlnet_blocks.") and k.endswith(".weight"))
    net = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(
        extra_condition_channels=channels - 64, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu",
        num_layers=blocks, image_model="qwen_image", **SIZES)
    net.load_state_dict(sd, strict=True)
    return comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(), concat_mask=channels == 68,
                                       load_device=torch.device("cpu"), manual_cast_dtype=None, extra_conds=[])
