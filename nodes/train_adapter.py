"""What Train ControlNet (Suite) needs from ComfyUI, and nothing else: is the connected model trainable, its label
input, CLIP and VAE as the trainer's encoders, and the base UNet rebuilt as `controlnet_core`'s own.

Why apart from the node: the node is the user's form (inputs, files, progress, Cancel); these are the host-facing
conversions, as `comfy_adapter.py` is for sampling.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Union

import comfy.model_management
import torch

from ..controlnet_core import ControlNetError
from ..controlnet_core.base_models.conditioning import SIZE_EMBED_DIM, sdxl_size_embedding
from ..controlnet_core.identity import encoder_identity
from ..controlnet_core.unet import UNetModel, unet_from_state_dict

log = logging.getLogger(__name__)

NODE = "Train ControlNet (Suite)"
TOKENS = 77  # one CLIP window: every prompt is encoded to the same length so a batch stacks
Text = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # context, or (context, y) for SDXL


class TrainNodeError(ControlNetError):
    """A Train ControlNet input that cannot be used as it is."""


def node_error(msg: str) -> TrainNodeError:
    return TrainNodeError(f"{NODE}: {msg}")


def check_trainable(model) -> str:
    """'eps' or 'v' for an SD1.x/SD2.x/SDXL-base UNet model; a clear error for anything the trainer cannot train."""
    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    family = type(getattr(base, "model_config", base)).__name__
    arch = type(dm).__name__
    if dm is None or not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise node_error(f"the connected model is {family} ({arch}); ControlNet training supports SD1.x/SD2.x/SDXL UNet models "
                     "(the paper's architecture). SD3, Flux and other transformer models need their own ControlNet type. "
                     "Connect an SD1.x, SD2.x or SDXL base checkpoint.")
    adm = label_channels(model)
    if adm and not _is_sdxl_base(base, adm):
        label = f"a {adm}-channel label input" if adm > 0 else "class labels"
        raise node_error(f"the connected model is {family} ({type(base).__name__}), a UNet with {label} that is not SDXL base's "
                     "pooled-text/size vector; the trainer feeds only that one (the SDXL refiner's aesthetic score, SVD's motion "
                     "inputs and the like are not trained). Connect an SD1.x, SD2.x or SDXL base checkpoint.")
    if getattr(dm, "in_channels", 4) != 4:
        raise node_error(f"the connected model is {family} with {dm.in_channels} input channels (an inpainting or other "
                     "special model); train on a plain text-to-image SD1.x/SD2.x/SDXL checkpoint.")
    model_type = getattr(getattr(base, "model_type", None), "name", "EPS")
    if model_type not in ("EPS", "V_PREDICTION"):
        raise node_error(f"the connected model {family} uses {model_type} sampling; only epsilon and v prediction are trained.")
    return "v" if model_type == "V_PREDICTION" else "eps"


def label_channels(model) -> int:
    """Width of the UNet's label input `y` (SDXL base: 2816), 0 when it has none (SD1.x/SD2.x), -1 for class labels."""
    base = model.model
    adm = (getattr(getattr(base, "model_config", None), "unet_config", {}) or {}).get("adm_in_channels")
    if not adm and getattr(base.diffusion_model, "num_classes", None) is not None:
        first = getattr(base.diffusion_model, "label_emb", None)
        try:
            adm = first[0][0].in_features  # "sequential": Linear(adm, ...) first
        except (TypeError, IndexError, AttributeError):
            adm = -1  # an nn.Embedding of class labels
    return int(adm or 0)


def _is_sdxl_base(base, adm: int) -> bool:
    """ComfyUI's SDXL model class (or one that shares its `encode_adm`): y = pooled text + 6 size embeddings.
    Classes with their own `encode_adm` (refiner: aesthetic score; SVD: fps/motion) build another vector."""
    import comfy.model_base

    sdxl = getattr(comfy.model_base, "SDXL", None)
    return (sdxl is not None and isinstance(base, sdxl) and type(base).encode_adm is sdxl.encode_adm
            and adm > 6 * SIZE_EMBED_DIM)


def text_encoder(clip, device: torch.device, size: Optional[int] = None, label: int = 0) -> Callable[[list[str]], Text]:
    """prompts -> (B, 77, width) with ComfyUI's CLIP, as CLIPTextEncode encodes them (clip layer included).

    SDXL (`label` > 0): prompts -> (context, y), y being what ComfyUI's SDXL model builds from CLIPTextEncode's
    pooled output when it samples a `size` x `size` image (`SDXL.encode_adm`: pooled text, then the embeddings of
    original size, crop (0, 0) and target size): the trained ControlNet sees the vector it will get at sampling.
    """
    memory: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    sizes = sdxl_size_embedding((size, size))[0] if label else None

    def encode_one(p: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tokens = clip.tokenize(p)
        if not label:
            cond, y = clip.encode_from_tokens(tokens), None
        else:
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            width = None if pooled is None else pooled.shape[-1] + sizes.shape[-1]
            if width != label:
                got = "no pooled output" if pooled is None else f"a {pooled.shape[-1]}-channel pooled output"
                raise node_error(f"the connected CLIP gives {got}, but the SDXL model's label input takes a {label - sizes.shape[-1]}-channel "
                             f"pooled output plus {sizes.shape[-1]} size channels; connect the CLIP of the same SDXL checkpoint.")
            y = torch.cat([pooled[0].detach().float().cpu(), sizes])
        if cond.shape[1] > TOKENS:
            log.warning("%s: prompt longer than %d tokens, truncated for training: %.60s...", NODE, TOKENS, p)
        # clone: out of inference mode
        return cond[0, :TOKENS].detach().float().cpu().clone(), None if y is None else y.clone()

    def encode(prompts: list[str]) -> Text:
        for p in prompts:
            if p not in memory:
                memory[p] = encode_one(p)
        context = torch.stack([memory[p][0] for p in prompts]).to(device)
        if not label:
            return context
        return context, torch.stack([memory[p][1] for p in prompts]).to(device)

    layer = getattr(clip, "layer_idx", None)
    encode.cache_identity = f"comfy-clip:{encoder_identity(clip.cond_stage_model)}:layer{layer}" + (f":sdxl-y{size}" if label else "")
    return encode


def image_encoder(vae, model, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) in [-1, 1] -> the latents the UNet sees (VAE encode, then the model's latent scaling)."""
    base = model.model

    def encode(images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1)  # IMAGE: BHWC in [0, 1]
        latents = base.process_latent_in(vae.encode(pixels).float())
        return latents.detach().float().clone().to(device)

    encode.cache_identity = f"comfy-vae:{encoder_identity(vae.first_stage_model)}:{type(base.latent_format).__name__}"
    return encode


def base_unet(model, device: torch.device) -> tuple[UNetModel, dict]:
    """Our UNet with the model's current weights (patches such as LoRAs applied), in float32, on `device`."""
    comfy.model_management.load_models_gpu([model])
    dm = model.model.diffusion_model
    sd = {k: v.detach().to(device=device, dtype=torch.float32).clone() for k, v in dm.state_dict().items()}
    cfg = getattr(model.model.model_config, "unet_config", {}) or {}
    heads = {k: cfg[k] for k in ("num_heads", "num_head_channels") if isinstance(cfg.get(k), int) and cfg[k] > 0}
    try:
        unet = unet_from_state_dict(sd, **heads).to(device)
    except ControlNetError as e:
        raise node_error(f"could not rebuild the connected model's UNet for training: {e}") from None
    # ComfyUI's copy is no longer needed while training (our copy has the weights): free its memory. CLIP and the
    # VAE load themselves again when they encode; the next sampler loads the model again.
    comfy.model_management.unload_all_models()
    return unet, heads
