"""Which model family a base checkpoint (or diffusers folder) is, from its keys; clear refusals otherwise.

Why from keys: file names lie, and a wrong guess trains a ControlNet on the wrong text encoder layer. The
families this trainer supports are the ldm UNet ones: SD1.x (CLIP ViT-L), SD2.x (OpenCLIP ViT-H) and SDXL
base (CLIP ViT-L + OpenCLIP bigG, `label_emb`). Everything else is named when recognised (SD3, Flux,
SDXL refiner, Stable Cascade, video models, ControlNets, LoRAs, bare UNets/VAEs, ...) and refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import TensorSource
from ..errors import ControlNetError, UnknownLayoutError
from .vae import SD_SCALE, SDXL_SCALE

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."  # CLIP ViT-L, Hugging Face layout (text_model.*)
SD2_TEXT = "cond_stage_model.model."  # OpenCLIP ViT-H
SDXL_TEXT_L = "conditioner.embedders.0.transformer."  # CLIP ViT-L, Hugging Face layout
SDXL_TEXT_G = "conditioner.embedders.1.model."  # OpenCLIP bigG
V_PRED_MARKERS = ("v_pred", UNET + "v_pred")  # written by ComfyUI when it saves a v-prediction model


class UnsupportedModelError(UnknownLayoutError):
    """A base model of a family the trainer cannot train a ControlNet for (or not a base model at all)."""


class IncompleteModelError(ControlNetError):
    """A base checkpoint without one of the parts training needs (UNet, VAE, text encoder, tokenizer files)."""


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl"
    label: str  # for messages
    vae_scale: float  # latent scale factor


FAMILIES = {
    "sd1": Family("sd1", "SD1.x", SD_SCALE),
    "sd2": Family("sd2", "SD2.x", SD_SCALE),
    "sdxl": Family("sdxl", "SDXL", SDXL_SCALE),
}

# (key that betrays the family, with or without the ldm UNet prefix) -> what it is
_OTHER_FAMILIES = [
    ("joint_blocks.0.context_block.adaLN_modulation.1.bias", "Stable Diffusion 3 / 3.5 (MMDiT)"),
    ("double_blocks.0.img_attn.norm.key_norm.scale", "Flux"),
    ("single_stream_modulation.lin.weight", "Flux.2"),
    ("clf.1.weight", "Stable Cascade"),
    ("clip_txt_mapper.weight", "Stable Cascade (stage C)"),
    ("double_layers.0.attn.w2q.weight", "AuraFlow"),
    ("t_embedder.mlp.0.weight", "a DiT-style model (PixArt, Hunyuan-DiT, ...)"),
    ("cap_embedder.0.weight", "Lumina 2"),
    ("head.modulation", "Wan"),
    ("patchify_proj.weight", "LTX-Video"),
    ("input_blocks.1.0.time_stack.in_layers.0.weight", "Stable Video Diffusion"),
    ("input_blocks.1.1.time_stack.0.attn1.to_q.weight", "Stable Video Diffusion"),
    ("edm_mean", "Playground v2.5 (EDM)"),
    ("edm_vpred.sigma_max", "an EDM v-prediction model"),
]


def _unsupported(source_name: str, what: str, extra: str = "") -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{source_name}: this is {what}. ControlNet training here supports ldm-UNet base models only: SD1.x, SD2.x and SDXL "
        f"(base) checkpoints, or their diffusers folders.{(' ' + extra) if extra else ''}"
    )


def _has_prefix(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_single_file(source: TensorSource) -> Family:
    """The family of a single-file ldm checkpoint, or an error naming what the file is instead."""
    keys = set(source.keys())
    name = source.name
    for key, what in _OTHER_FAMILIES:
        if key in keys or UNET + key in keys:
            raise _unsupported(name, what)
    if UNET + "input_blocks.0.0.weight" not in keys:
        if _has_prefix(keys, "control_model.") or "zero_convs.0.0.weight" in keys or "controlnet_cond_embedding.conv_in.weight" in keys:
            raise _unsupported(name, "a ControlNet, not a base model", "Pass the SD checkpoint the ControlNet is for as --base.")
        if "input_blocks.0.0.weight" in keys or ("conv_in.weight" in keys and "down_blocks.0.resnets.0.conv1.weight" in keys):
            raise IncompleteModelError(
                f"{name}: a bare UNet (diffusion model only); training also needs the VAE and the text encoder(s). "
                "Use the full checkpoint (UNet + VAE + text encoder, as in models/checkpoints) or a diffusers folder."
            )
        if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
            raise IncompleteModelError(f"{name}: a VAE on its own, not a base model. Use the full SD checkpoint or a diffusers folder.")
        if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
            raise _unsupported(name, "a LoRA", "Pass the full checkpoint the LoRA was trained on.")
        raise UnsupportedModelError(
            f"{name}: no ldm UNet ('{UNET}input_blocks.0.0.weight') among its {len(keys)} tensors; not an SD1.x/SD2.x/SDXL checkpoint. "
            "Expected a full ldm checkpoint (UNet under model.diffusion_model., VAE under first_stage_model., text encoder under "
            "cond_stage_model. or conditioner.embedders.) or a diffusers folder."
        )
    if source.shape(UNET + "input_blocks.0.0.weight")[1] != 4:
        ch = source.shape(UNET + "input_blocks.0.0.weight")[1]
        raise _unsupported(name, f"a UNet with {ch} input channels (inpainting, instruct-pix2pix or upscaler); the trainer needs 4 (latents only)")
    label_emb = UNET + "label_emb.0.0.weight" in keys
    if _has_prefix(keys, "conditioner.embedders.0.model.") and not _has_prefix(keys, SDXL_TEXT_G):
        raise _unsupported(name, "the SDXL refiner (OpenCLIP bigG only, aesthetic-score conditioning)", "Use the SDXL base model.")
    if _has_prefix(keys, SDXL_TEXT_L) and _has_prefix(keys, SDXL_TEXT_G):
        family = FAMILIES["sdxl"]
        if not label_emb:
            raise _unsupported(name, "an SDXL-style model without the UNet's label embedding (label_emb)")
    elif _has_prefix(keys, SD1_TEXT) and not label_emb:
        family = FAMILIES["sd1"]
    elif _has_prefix(keys, SD2_TEXT) and not label_emb:
        family = FAMILIES["sd2"]
    elif label_emb and (_has_prefix(keys, SD2_TEXT) or _has_prefix(keys, "embedder.")):
        raise _unsupported(name, "an unCLIP model (image-embedding conditioning)")
    else:
        raise IncompleteModelError(
            f"{name}: missing text encoder: no tensors under '{SD1_TEXT}' (SD1.x CLIP ViT-L), '{SD2_TEXT}' (SD2.x OpenCLIP ViT-H) "
            f"or '{SDXL_TEXT_L}' + '{SDXL_TEXT_G}' (SDXL). The file holds only the UNet{' and VAE' if _has_prefix(keys, VAE) else ''}; "
            "use the full checkpoint or a diffusers folder."
        )
    if VAE + "encoder.conv_in.weight" not in keys or VAE + "decoder.conv_in.weight" not in keys:
        raise IncompleteModelError(
            f"{name}: missing VAE: no '{VAE}encoder.*'/'{VAE}decoder.*' tensors ({family.label} checkpoint without its VAE). "
            "Training encodes the images with it; use a checkpoint that includes the VAE, or a diffusers folder."
        )
    return family


def prediction_of_single_file(source: TensorSource, family: Family) -> Optional[str]:
    """'v' for files marked v-prediction, 'eps' where the family is always eps, None where the weights cannot tell (SD2.x)."""
    keys = set(source.keys())
    if "ztsnr" in keys:
        raise _unsupported(source.name, "a zero-terminal-SNR v-prediction model (ztsnr)", "The trainer's noise schedule is SD's scaled-linear one.")
    if any(m in keys for m in V_PRED_MARKERS):
        return "v"
    return None if family.name == "sd2" else "eps"


def detect_diffusers_folder(folder: Path, model_index: dict, text_act: Optional[str]) -> Family:
    """The family of a diffusers pipeline folder, from its components (and the first text encoder's activation)."""
    cls = model_index.get("_class_name", "")
    if not (folder / "unet").is_dir():
        if (folder / "transformer").is_dir() or (folder / "prior").is_dir() or (folder / "decoder").is_dir():
            raise _unsupported(str(folder), f"a diffusers {cls or 'transformer-based'} pipeline (no unet/ folder)")
        raise UnsupportedModelError(
            f"{folder}: not a diffusers model folder (no unet/). Expected unet/, vae/, text_encoder/ (+ text_encoder_2/ for SDXL) "
            "and tokenizer/, or pass a single-file checkpoint."
        )
    if "Refiner" in cls or ((folder / "text_encoder_2").is_dir() and not (folder / "text_encoder").is_dir()):
        raise _unsupported(str(folder), "the SDXL refiner", "Use the SDXL base model.")
    for part in ("vae", "text_encoder"):
        if not (folder / part).is_dir():
            what = "VAE" if part == "vae" else "text encoder"
            raise IncompleteModelError(f"{folder}: missing {what}: no {part}/ folder. Training needs UNet, VAE and text encoder(s); download the whole pipeline.")
    if (folder / "text_encoder_2").is_dir():
        return FAMILIES["sdxl"]
    return FAMILIES["sd2"] if text_act == "gelu" else FAMILIES["sd1"]


__all__ = ["Family", "FAMILIES", "UnsupportedModelError", "IncompleteModelError", "detect_single_file", "detect_diffusers_folder",
           "prediction_of_single_file", "UNET", "VAE", "SD1_TEXT", "SD2_TEXT", "SDXL_TEXT_L", "SDXL_TEXT_G"]
