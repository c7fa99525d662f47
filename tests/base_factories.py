"""Tiny random-weight SD1.x / SD2.x / SDXL base models with the exact published key names, made here.

The parts come from independent implementations, so the key names are theirs, not ours: the UNet and the
VAE from ComfyUI's own classes (ldm names), CLIP ViT-L from transformers' `CLIPTextModel` (the Hugging Face
names SD1.x/SDXL checkpoints use), and the OpenCLIP towers as open_clip names them, produced from a
transformers model by the table below and checked (`test_openclip_names_are_the_ones_comfy_reads`) to be
exactly what ComfyUI's converter turns back into the Hugging Face layout. Widths and depths are shrunk; the
vocabulary (49,408) and the 77 positions stay, so the real tokenizer files drive them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from comfy_host import comfy_root
from factories import comfy_unet, randomize_, save

from controlnet_core import ControlNetConfig

TOKENIZER_DIR = comfy_root() / "comfy" / "sd1_tokenizer"
SIZE_EMBED = 256  # SDXL's per-value size-embedding width (fixed by the format: 2816 = 1280 + 6 * 256)

# UNet shapes (encoder part); context_dim/adm_in_channels are filled in to fit the text encoders
UNET_SD1 = ControlNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1), context_dim=64)
UNET_SD15_DETECTABLE = ControlNetConfig(model_channels=320, channel_mult=(1,), num_res_blocks=(1,), transformer_depth=(1,), context_dim=768)  # ComfyUI's SD15 entry
UNET_SD2 = replace(UNET_SD1, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
UNET_SDXL = ControlNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(0, 1), transformer_depth_middle=1,
                             context_dim=128, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1,
                    attn_resolutions=[], dropout=0.0)


def clip_config(width: int, layers: int = 2, act: str = "quick_gelu", projection: bool = False) -> dict:
    """A transformers/ComfyUI CLIP text config (the JSON both read), 64 channels per head as in every SD text encoder."""
    return {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"], "model_type": "clip_text_model",
            "attention_dropout": 0.0, "dropout": 0.0, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1, "hidden_act": act,
            "hidden_size": width, "intermediate_size": 4 * width, "layer_norm_eps": 1e-5, "max_position_embeddings": 77,
            "num_attention_heads": max(1, width // 64), "num_hidden_layers": layers, "projection_dim": width, "vocab_size": 49408,
            "initializer_factor": 1.0, "initializer_range": 0.02}


def hf_clip(width: int, layers: int = 2, act: str = "quick_gelu", projection: bool = False, seed: int = 0):
    """A random transformers CLIPTextModel(WithProjection); every weight (norms and biases too) randomised."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in clip_config(width, layers, act, projection).items() if k not in ("architectures", "model_type")})
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return randomize_(model, seed).eval()


def hf_state(model) -> dict:
    """The Hugging Face layout as SD checkpoints and diffusers folders store it: `text_model.*` (+ `text_projection.weight`).
    transformers >= 5 drops the `text_model.` level from a bare CLIPTextModel; the published files have it."""
    sd = model.state_dict()
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in sd.items()}


def hf_to_openclip(sd: dict) -> dict:
    """Hugging Face CLIP text keys -> open_clip's (q/k/v packed into in_proj, text_projection as a (width, proj) matrix)."""
    out = {}
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"], out["ln_final.bias"] = sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def comfy_vae(seed: int = 0):
    """ComfyUI's ldm AutoencoderKL (the class ComfyUI loads SD VAEs into), small, random."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return randomize_(AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4), seed).eval()


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v.detach().clone() for k, v in sd.items()}


def sd1_checkpoint(path: Path, *, clip_width: int = 64, unet: ControlNetConfig = UNET_SD1, context_dim: Optional[int] = None, seed: int = 0,
                   dtype=torch.float32) -> dict:
    """A full SD1.x-layout checkpoint; returns its parts (ComfyUI UNet, ComfyUI VAE, transformers CLIP) for oracles.
    The UNet's cross-attention width is the CLIP width unless `context_dim` says otherwise (a mismatched file)."""
    parts = {"unet": comfy_unet(replace(unet, context_dim=context_dim or clip_width), seed), "vae": comfy_vae(seed + 1),
             "clip": hf_clip(clip_width, seed=seed + 2)}
    sd = prefixed("model.diffusion_model.", parts["unet"].state_dict())
    sd.update(prefixed("first_stage_model.", parts["vae"].state_dict()))
    sd.update(prefixed("cond_stage_model.transformer.", hf_state(parts["clip"])))
    save(path, {k: v.to(dtype) for k, v in sd.items()})
    return parts


def sd2_checkpoint(path: Path, *, clip_width: int = 64, seed: int = 0, v_pred: bool = False) -> dict:
    parts = {"unet": comfy_unet(replace(UNET_SD2, context_dim=clip_width), seed), "vae": comfy_vae(seed + 1),
             "clip": hf_clip(clip_width, layers=3, act="gelu", projection=True, seed=seed + 2)}
    sd = prefixed("model.diffusion_model.", parts["unet"].state_dict())
    sd.update(prefixed("first_stage_model.", parts["vae"].state_dict()))
    sd.update(prefixed("cond_stage_model.model.", hf_to_openclip(hf_state(parts["clip"]))))
    if v_pred:
        sd["v_pred"] = torch.tensor([])
    save(path, sd)
    return parts


def sdxl_checkpoint(path: Path, *, l_width: int = 64, g_width: int = 64, seed: int = 0) -> dict:
    cfg = replace(UNET_SDXL, context_dim=l_width + g_width, adm_in_channels=g_width + 6 * SIZE_EMBED)
    parts = {"unet": comfy_unet(cfg, seed), "vae": comfy_vae(seed + 1), "clip_l": hf_clip(l_width, layers=3, seed=seed + 2),
             "clip_g": hf_clip(g_width, layers=3, act="gelu", projection=True, seed=seed + 3), "config": cfg}
    sd = prefixed("model.diffusion_model.", parts["unet"].state_dict())
    sd.update(prefixed("first_stage_model.", parts["vae"].state_dict()))
    sd.update(prefixed("conditioner.embedders.0.transformer.", hf_state(parts["clip_l"])))
    sd.update(prefixed("conditioner.embedders.1.model.", hf_to_openclip(hf_state(parts["clip_g"]))))
    save(path, sd)
    return parts


def copy_tokenizer(dest: Path, pad_token: str = "<|endoftext|>") -> Path:
    """The real CLIP vocabulary files (from the ComfyUI host), with a diffusers-style special_tokens_map.json."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, dest / name)
    (dest / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                              "pad_token": pad_token, "unk_token": "<|endoftext|>"}))
    return dest


def unit_inputs(batch: int = 2, latent: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, latent, latent, generator=g), torch.tensor([999.0, 321.0][:batch])
