"""Load ControlNet (Suite): any supported ControlNet / T2I-Adapter file from the `controlnet` model folders."""
from __future__ import annotations

from pathlib import Path

import comfy.model_management
import folder_paths
import torch

from ..controlnet_core import ControlNetError, load_control
from ..controlnet_core.checkpoint import DictSource
from ..controlnet_core.formats.record import Format
from .comfy_adapter import SuiteControl, make_patcher

GAP_CHOICES = ["auto", "on", "off"]


def host_compute_dtype(fmt: Format, stored: torch.dtype) -> torch.dtype:
    """The dtype ComfyUI's own ControlNet loader would compute this file in: its storage choice for the family's
    supported dtypes (an fp8 file stays fp8), then its manual-cast dtype for the device when the weights are stored
    in another. With `keep_fp8` on the load, the weights are then held as the host holds them."""
    mm = comfy.model_management
    supported = [getattr(torch, n) for n in fmt.inference_dtypes]
    try:
        storage = mm.unet_dtype(model_params=-1, supported_dtypes=supported, weight_dtype=stored)
    except TypeError:  # hosts before 2024-08 take no weight_dtype (and know no fp8 ControlNets)
        storage = mm.unet_dtype(supported_dtypes=supported)
    return mm.unet_manual_cast(storage, mm.get_torch_device(), supported) or storage


class ControlNetSuiteLoader:
    DESCRIPTION = (
        "Loads a ControlNet or T2I-Adapter in any common format: original v1.0/v1.1 .pth/.safetensors, diffusers, "
        "'diff' ControlNets, Stability control-LoRAs, T2I-Adapters, SDXL union (ControlNet++ / ProMax), SD3 / SD3.5 "
        "ControlNets (InstantX, alimama inpainting, Stability's SD3.5 Large blur / canny / depth) and Flux ControlNets "
        "(InstantX, Shakker union, Union Pro 2.0, alimama inpainting, XLabs, MistoLine; fp8 files stay fp8 in memory, as in ComfyUI's loader) and Qwen-Image "
        "ControlNets (InstantX, union, inpainting; DiffSynth's blockwise model patches) and Z-Image Fun ControlNet unions "
        "(alibaba-pai 1 / 2.0 / 2.1); the model patches go to Apply ControlNet Patch "
        "(Suite). The layout is "
        "detected from the file's tensors. Diff ControlNets and control-LoRAs need the base model connected to 'model'; "
        "SD3, SD3.5, Qwen-Image and latent-hint Flux ControlNets need the VAE on the apply node."
    )
    CATEGORY = "loaders"
    RETURN_TYPES = ("CONTROL_NET",)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The control model, usable by this suite's apply/stack nodes and by ComfyUI's own Apply ControlNet.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_net_name": (folder_paths.get_filename_list("controlnet"), {
                    "tooltip": "A file from models/controlnet (or models/t2i_adapter, or any folder registered for 'controlnet')."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "The base model. Needed only for 'diff' ControlNets and control-LoRAs, which store weights relative to it."}),
                "global_average_pooling": (GAP_CHOICES, {"default": "auto", "tooltip": (
                    "Shuffle ControlNets average their residuals over the image. 'auto' detects it from the file "
                    "(metadata, config, or 'shuffle' in the official file's name).")}),
            },
        }

    def load(self, control_net_name, model=None, global_average_pooling="auto"):
        path = folder_paths.get_full_path("controlnet", control_net_name)
        if path is None:
            raise FileNotFoundError(
                f"Load ControlNet (Suite): '{control_net_name}' was not found in the controlnet model folders "
                f"{folder_paths.get_folder_paths('controlnet')}. Put the file there and refresh."
            )
        base = None
        if model is not None:
            base = DictSource(model.model.diffusion_model.state_dict(), name=f"base model of {control_net_name}")
        gap = {"auto": None, "on": True, "off": False}[global_average_pooling]
        try:
            loaded = load_control(path, base_unet=base, dtype=host_compute_dtype, device=comfy.model_management.unet_offload_device(),
                                  global_average_pooling=gap, keep_fp8=True)
        except ControlNetError as e:  # the library's message, with its class, behind the node's name
            raise type(e)(f"Load ControlNet (Suite): {e}") from None
        return (SuiteControl(loaded, make_patcher(loaded.model), name=Path(control_net_name).name),)
