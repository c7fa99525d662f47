"""A tiny SDXL base as ComfyUI's own MODEL, CLIP and VAE objects, for the Train ControlNet node's SDXL tests.

Why not a checkpoint file through CheckpointLoaderSimple: ComfyUI recognises SDXL only at full size (its
detection table pins 320 channels, transformer depths up to 10 and a 2048-wide context), far too slow for CPU
tests. So the parts of `base_factories.sdxl_checkpoint` (random weights, published key names) are loaded into
the classes ComfyUI's loader would build: `supported_models.SDXL` -> `model_base.SDXL` (its `encode_adm`),
`sd.CLIP` around `sdxl_clip.SDXLClipModel` with both towers scaled down but set up as ComfyUI sets them up
(penultimate layers, no final norm, bigG padded with 0 and its projected pooled output), and `sd.VAE` (TAESD).
The test node `SuiteTestProvided` hands them to a prompt.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import torch
from base_factories import clip_config, hf_state, sdxl_checkpoint
from factories import comfy_unet_kwargs, randomize_


def _tiny_clip_class(l_json: Path, g_json: Path):
    import comfy.sd1_clip
    import comfy.sdxl_clip

    accepts_options = "model_options" in inspect.signature(comfy.sd1_clip.SDClipModel.__init__).parameters

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        """ComfyUI's SDXLClipModel (its encode_token_weights and options) with scaled-down towers; the settings are
        those of SDXLClipModel.__init__ / SDXLClipG.__init__, only the JSON configs differ."""

        def __init__(self, device="cpu", dtype=None, model_options=None, **_):
            torch.nn.Module.__init__(self)
            opts = lambda extra: {"model_options": {**(model_options or {}), **extra}} if accepts_options else {}  # noqa: E731
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                                                     textmodel_json_config=str(l_json), **opts({}))
            self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                                                     textmodel_json_config=str(g_json), special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                                     **opts({"model_name": "clip_g"}))
            self.dtypes = {dtype}

    return TinySDXLClip


def tiny_sdxl(root: Path, seed: int = 11, width: int = 64) -> dict:
    """{'model': ModelPatcher, 'clip': CLIP, 'vae': VAE, 'parts': the factory's modules}; files under `root`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.taesd.taesd

    root.mkdir(parents=True, exist_ok=True)
    parts = sdxl_checkpoint(root / "tiny_sdxl.safetensors", l_width=width, g_width=width, seed=seed)
    with torch.no_grad():  # ComfyUI builds its models under no_grad
        base = comfy.supported_models.SDXL(comfy_unet_kwargs(parts["config"])).get_model({})
    base.diffusion_model.load_state_dict(parts["unet"].state_dict())
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    configs = {}
    for name, act in (("l", "quick_gelu"), ("g", "gelu")):  # as the factory's towers (3 layers each)
        configs[name] = root / f"clip_{name}.json"
        configs[name].write_text(json.dumps(clip_config(width, 3, act, projection=True)))
    with torch.no_grad():
        clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, _tiny_clip_class(configs["l"], configs["g"])))
    for tower, hf in ((clip.cond_stage_model.clip_l, parts["clip_l"]), (clip.cond_stage_model.clip_g, parts["clip_g"])):
        missing, unexpected = tower.load_sd(hf_state(hf))
        assert not unexpected and set(missing) <= {"text_projection.weight", "logit_scale"}, (missing, unexpected)
    vae = comfy.sd.VAE(sd=randomize_(comfy.taesd.taesd.TAESD(), seed + 5).state_dict())
    return {"model": model, "clip": clip, "vae": vae, "parts": parts}


def refiner_model():
    """ComfyUI's SDXL refiner class (label input: pooled text + size + aesthetic score, 2560 wide at full size), tiny."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from base_factories import UNET_SDXL

    cfg = replace(UNET_SDXL, context_dim=64, adm_in_channels=64 + 5 * 256)
    with torch.no_grad():
        base = comfy.supported_models.SDXLRefiner(comfy_unet_kwargs(cfg)).get_model({})
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
