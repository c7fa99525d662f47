"""`load_base_model`: an SD1.x/SD2.x/SDXL checkpoint or diffusers folder -> UNet, VAE, text conditioning.

Why one entry point: training a ControlNet needs the locked UNet, the VAE encoder (targets -> latents) and
the text encoder(s) of the same base model, wired the way that family was trained. Each part is built on
`meta` from the shapes and filled tensor by tensor (see `weights.py`); the parts are checked against each
other (text width = the UNet's cross-attention width, SDXL's `y` width, VAE latent channels) so that a
mismatched file fails here, with names, rather than as a shape error in the first training step.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint import TensorSource, open_checkpoint
from ..errors import CheckpointError
from ..formats.diffusers import heads_from_config
from ..unet import UNetModel, unet_from_state_dict
from . import detect
from .clip_text import IGNORED_KEYS, CLIPTextModel, OpenCLIPTextModel, TextTransformer
from .conditioning import Branch, TextConditioner
from .diffusers_keys import unet_key_map, vae_key_map
from .locate import component_weights, find_tokenizer_dir, read_json
from .tokenizer import CLIPTokenizer
from .vae import AutoencoderKL
from .weights import load_module, prefixed

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass
class BaseModel:
    """A loaded base model: `text` is the trainer's `encode_text`, `vae` (called) its `encode_image`."""

    family: detect.Family
    unet: UNetModel
    vae: AutoencoderKL
    text: TextConditioner
    prediction: Optional[str]  # "eps" / "v"; None: the weights do not say (SD2.x single files)
    source: str

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "BaseModel":
        """Move every part; `dtype` applies to the UNet and text encoders (the VAE keeps its own)."""
        self.unet.to(device=device, dtype=dtype)
        self.text.to(device=device, dtype=dtype)
        self.vae.to(device=device)
        return self


def _shapes(source: TensorSource, mapping: dict[str, str]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(source.shape(v)) for k, v in mapping.items()}


def _unet(source: TensorSource, mapping: dict[str, str], dtype, heads: tuple[Optional[int], Optional[int]] = (None, None)) -> UNetModel:
    sd = {k: source.get(v, dtype) for k, v in mapping.items() if k not in ("v_pred",)}  # converted one tensor at a time
    num_heads, num_head_channels = heads
    try:
        return unet_from_state_dict(sd, dtype=dtype, num_heads=num_heads, num_head_channels=num_head_channels).requires_grad_(False)
    except CheckpointError as e:
        raise CheckpointError(f"{source.name} (UNet): {e}") from None


def _diffusers_unet(folder: Path, dtype) -> UNetModel:
    """unet/ of a diffusers folder; head counts come from its config.json (diffusers' `attention_head_dim` is a head count)."""
    cfg = read_json(folder / "unet" / "config.json")
    src = component_weights(folder / "unet")
    heads = heads_from_config(cfg, tuple(cfg["block_out_channels"])) if "block_out_channels" in cfg else (None, None)
    return _unet(src, unet_key_map(src.keys()), dtype, heads)


def _vae(source: TensorSource, mapping: dict[str, str], scale: float, dtype) -> AutoencoderKL:
    cfg = AutoencoderKL.config_from_shapes(_shapes(source, mapping), scale_factor=scale, source=f"{source.name} (VAE)")
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    return load_module(model, source, mapping, what="VAE", dtype=dtype)


def _text(cls, source: TensorSource, mapping: dict[str, str], what: str, dtype, **config_kw) -> TextTransformer:
    cfg = cls.config_from_shapes(_shapes(source, mapping), source=f"{source.name} ({what})", **config_kw)
    with torch.device("meta"):
        model = cls(cfg)
    return load_module(model, source, mapping, what=what, dtype=dtype, ignore=IGNORED_KEYS)


def _single_file(path: Path, dtype, vae_dtype) -> tuple[detect.Family, UNetModel, AutoencoderKL, list, list[Branch], Optional[str]]:
    src = open_checkpoint(path)
    family = detect.detect_single_file(src)
    prediction = detect.prediction_of_single_file(src, family)
    unet = _unet(src, prefixed(src, detect.UNET), dtype)
    vae_keys = {k: v for k, v in prefixed(src, detect.VAE).items() if not k.startswith("loss.")}  # some keep the training loss (LPIPS, discriminator)
    vae = _vae(src, vae_keys, family.vae_scale, vae_dtype)
    if family.name == "sd1":
        encoders = [_text(CLIPTextModel, src, prefixed(src, detect.SD1_TEXT), "CLIP ViT-L text encoder", dtype)]
        branches = [Branch(layer=-1, final_norm=True, pad_id=-1)]
    elif family.name == "sd2":
        encoders = [_text(OpenCLIPTextModel, src, prefixed(src, detect.SD2_TEXT), "OpenCLIP ViT-H text encoder", dtype)]
        branches = [Branch(layer=-2, final_norm=True, pad_id=0)]
    else:
        encoders = [_text(CLIPTextModel, src, prefixed(src, detect.SDXL_TEXT_L), "CLIP ViT-L text encoder", dtype),
                    _text(OpenCLIPTextModel, src, prefixed(src, detect.SDXL_TEXT_G), "OpenCLIP bigG text encoder", dtype)]
        branches = [Branch(layer=-2, final_norm=False, pad_id=-1), Branch(layer=-2, final_norm=False, pad_id=0)]
    return family, unet, vae, encoders, branches, prediction


def _hf_text_keys(keys) -> dict[str, str]:
    """{our key: stored key}: transformers >= 5 saves a bare CLIPTextModel without the `text_model.` level."""
    return {(k if k.startswith(("text_model.", "text_projection.", "logit_scale")) else "text_model." + k): k for k in keys}


def _pad_id(folder: Path, tokenizer_dir: str, default: int) -> int:
    """A diffusers tokenizer folder's own pad token ('<|endoftext|>' for CLIP-L, '!' = id 0 for the OpenCLIP ones)."""
    special = read_json(folder / tokenizer_dir / "special_tokens_map.json").get("pad_token")
    content = special.get("content") if isinstance(special, dict) else special
    if content is None:
        return default
    vocab = read_json(folder / tokenizer_dir / "vocab.json")
    if content not in vocab:
        raise CheckpointError(f"{folder / tokenizer_dir}: pad token {content!r} is not in vocab.json.")
    return int(vocab[content])


def _diffusers_folder(folder: Path, dtype, vae_dtype) -> tuple[detect.Family, UNetModel, AutoencoderKL, list, list[Branch], Optional[str]]:
    te_cfg = read_json(folder / "text_encoder" / "config.json")
    family = detect.detect_diffusers_folder(folder, read_json(folder / "model_index.json"), te_cfg.get("hidden_act"))
    unet_cfg = read_json(folder / "unet" / "config.json")
    if unet_cfg.get("in_channels", 4) != 4:
        raise detect.UnsupportedModelError(f"{folder}: the UNet has {unet_cfg['in_channels']} input channels (inpainting/instruct-pix2pix); the trainer needs 4.")
    unet = _diffusers_unet(folder, dtype)
    vae_src = component_weights(folder / "vae")
    scale = read_json(folder / "vae" / "config.json").get("scaling_factor", family.vae_scale)
    vae = _vae(vae_src, vae_key_map(vae_src.keys()), float(scale), vae_dtype)
    encoders, branches = [], []
    parts = [("text_encoder", "tokenizer")] + ([("text_encoder_2", "tokenizer_2")] if family.name == "sdxl" else [])
    for i, (part, tok) in enumerate(parts):
        cfg = read_json(folder / part / "config.json")
        te_src = component_weights(folder / part)
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"{folder / part}: hidden_act {act!r}; CLIP text encoders use 'quick_gelu' or 'gelu'.")
        encoders.append(_text(CLIPTextModel, te_src, _hf_text_keys(te_src.keys()), f"{part}", dtype,
                              heads=cfg.get("num_attention_heads"), activation=act))
        default_pad = 0 if (i == 1 or family.name == "sd2") else -1
        if family.name == "sdxl":  # the SDXL pipeline takes the penultimate hidden state of both, without the final norm
            branches.append(Branch(layer=-2, final_norm=False, pad_id=_pad_id(folder, tok, default_pad)))
        else:  # SD1.x, SD2.x: last_hidden_state (SD2's folder is already cut to the ldm penultimate layer)
            branches.append(Branch(layer=-1, final_norm=True, pad_id=_pad_id(folder, tok, default_pad)))
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon"))
    if prediction is None:
        raise detect.UnsupportedModelError(f"{folder}/scheduler: prediction type is not 'epsilon' or 'v_prediction'; the trainer supports only those.")
    return family, unet, vae, encoders, branches, prediction


def load_unet(path: PathLike, *, dtype: torch.dtype = torch.float32) -> UNetModel:
    """Only the UNet of a full ldm checkpoint (`model.diffusion_model.*`) or of a diffusers folder (`unet/`)."""
    path = Path(path)
    if path.is_dir():
        return _diffusers_unet(path, dtype)
    src = open_checkpoint(path)
    mapping = prefixed(src, detect.UNET)
    if not mapping:
        detect.detect_single_file(src)  # names what the file is instead
    return _unet(src, mapping, dtype)


def load_base_model(path: PathLike, *, tokenizer: Optional[PathLike] = None, dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                    image_size: tuple[int, int] = (1024, 1024)) -> BaseModel:
    """Load a base model for ControlNet training.

    Args:
        path: a single-file ldm checkpoint (.safetensors, or .ckpt/.pt read with `weights_only=True`) or a diffusers folder.
        tokenizer: a folder with the CLIP `vocab.json` + `merges.txt` (or a ComfyUI root / diffusers folder holding one);
            default: searched (see `locate.find_tokenizer_dir`).
        dtype: UNet and text encoders; vae_dtype: the VAE (fp32 by default: SDXL's VAE overflows in fp16).
        image_size: (h, w) of the training images, for SDXL's size conditioning (ignored by SD1.x/SD2.x).
    Raises `UnsupportedModelError`/`IncompleteModelError`/`CheckpointError`/`TokenizerError` (all `ControlNetError`s).
    """
    path = Path(path)
    if path.is_dir():
        family, unet, vae, encoders, branches, prediction = _diffusers_folder(path, dtype, vae_dtype)
    elif path.is_file():
        family, unet, vae, encoders, branches, prediction = _single_file(path, dtype, vae_dtype)
    else:
        raise detect.IncompleteModelError(f"{path}: no such file or folder. Pass an SD checkpoint file or a diffusers model folder.")
    tok = CLIPTokenizer.from_dir(find_tokenizer_dir(path, Path(tokenizer) if tokenizer else None))
    branches = [Branch(b.layer, b.final_norm, tok.end_id if b.pad_id < 0 else b.pad_id) for b in branches]
    for enc in encoders:
        if len(tok.vocab) > enc.config.vocab_size:
            raise CheckpointError(f"{path}: the tokenizer ({tok.source}) has {len(tok.vocab)} tokens but the text encoder embeds only {enc.config.vocab_size}.")
    pooled_from, size_dim = None, 0
    ucfg = unet.config.encoder
    if family.name == "sdxl":
        pooled_from = 1
        proj = encoders[1].config.projection_dim
        extra = (ucfg.adm_in_channels or 0) - (proj or 0)
        if not proj or extra <= 0 or extra % 6:
            raise CheckpointError(
                f"{path}: the UNet's label embedding takes {ucfg.adm_in_channels} values, but bigG's pooled output has {proj}; "
                "SDXL's y is the pooled output plus 6 size embeddings of equal width. The parts do not belong together."
            )
        size_dim = extra // 6
    text = TextConditioner(tok, encoders, branches, pooled_from, size_dim, image_size)
    if text.context_dim != ucfg.context_dim:
        raise CheckpointError(
            f"{path}: the text encoder{'s give' if len(encoders) > 1 else ' gives'} {text.context_dim} channels but the UNet's "
            f"cross-attention expects {ucfg.context_dim}; the parts do not belong to one {family.label} model."
        )
    if vae.config.embed_dim != ucfg.in_channels or vae.config.downsampling != 8:
        raise CheckpointError(
            f"{path}: the VAE gives {vae.config.embed_dim}-channel latents at 1/{vae.config.downsampling} size; the UNet takes "
            f"{ucfg.in_channels} channels and ControlNet hints need 1/8."
        )
    model = BaseModel(family, unet, vae, text, prediction, str(path)).to(device)
    log.info("base model %s: %s, UNet %s, %d text encoder(s), prediction %s", path, family.label, ucfg.family(), len(encoders), prediction or "unknown")
    return model


__all__ = ["BaseModel", "load_base_model", "load_unet"]
