"""Base models for ControlNet training: SD1.x, SD2.x and SDXL checkpoints or diffusers folders.

`load_base_model(path)` gives the UNet (ldm layout, `controlnet_core.unet.UNetModel`), the VAE
(`AutoencoderKL`, encoder for training, decoder for validation images) and the text conditioning
(`TextConditioner`: prompts -> context, plus SDXL's `y`), with a CLIP tokenizer read from disk.
Never imports ComfyUI, diffusers or transformers.
"""
from .clip_text import CLIPTextModel, OpenCLIPTextModel, TextEncoderConfig
from .conditioning import Branch, TextConditioner
from .detect import FAMILIES, Family, IncompleteModelError, UnsupportedModelError, detect_single_file
from .load import BaseModel, load_base_model, load_unet
from .locate import find_tokenizer_dir
from .tokenizer import CLIPTokenizer, TokenizerError
from .vae import SD_SCALE, SDXL_SCALE, AutoencoderKL, VAEConfig

__all__ = [
    "CLIPTextModel", "OpenCLIPTextModel", "TextEncoderConfig", "Branch", "TextConditioner", "FAMILIES", "Family",
    "IncompleteModelError", "UnsupportedModelError", "detect_single_file", "BaseModel", "load_base_model", "load_unet",
    "find_tokenizer_dir", "CLIPTokenizer", "TokenizerError", "SD_SCALE", "SDXL_SCALE", "AutoencoderKL", "VAEConfig",
]
