"""One ComfyUI node per annotator, generated from the annotator registry, plus an "any annotator" node.

Every node takes an IMAGE batch (video frames too), runs it through the annotator in chunks with a
progress bar, and returns an IMAGE batch of the same length (pose nodes also return keypoints).
Weights come from the `annotators` model folder(s); neural networks are built once and handed to
ComfyUI's model manager, which loads and offloads them. Each node's `resolution` widget takes its default and
limits from the annotator's own `resolution` parameter (`registry.resolution_param`).
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Optional

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..annotators import registry
from ..annotators.base import (
    AnnotatorError,
    NetworkAnnotator,
    as_rgb,
    bounded_chunk_size,
    check_detect_size,
    default_chunk_size,
    detect_size,
    resize_to,
    sanitized,
)

CATEGORY = "image/preprocessors/ControlNet Suite"
DEFAULT_RESOLUTION = 512  # detect resolution of annotators that declare none (invert, normals...): the nodes resize to it

if "annotators" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["annotators"] = ([os.path.join(folder_paths.models_dir, "annotators")], set(folder_paths.supported_pt_extensions))


def annotator_dirs() -> list:
    return list(folder_paths.get_folder_paths("annotators"))


def pixel_perfect_resolution(height: int, width: int, resolution: int, pixel_perfect: bool, target_latent) -> int:
    """Detect resolution; with pixel_perfect, the one at which the map needs no further resampling for the target."""
    if not pixel_perfect:
        return resolution
    if target_latent is None:
        return min(height, width)
    th, tw = (s * 8 for s in target_latent["samples"].shape[-2:])
    return int(round(min(height, width) * max(th / height, tw / width)))


# detector -> {id(network): its ModelPatcher}; weak, so a detector the registry dropped (its file changed) goes with them
_patchers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _patcher(det, net: torch.nn.Module):
    """The ModelPatcher of one of `det`'s networks, made once; ComfyUI loads and offloads the network through it."""
    own = _patchers.setdefault(det, {})
    p = own.get(id(net))
    if p is None or p.model is not net:
        offload = comfy.model_management.unet_offload_device()
        net.to(offload)  # a patcher takes its model to be there (a no-op, but for an OpenPose hand or face network
        # loaded next to a body the host had already moved to the GPU)
        p = own[id(net)] = comfy.model_patcher.ModelPatcher(net, load_device=comfy.model_management.get_torch_device(), offload_device=offload)
    return p


def _prepare_device(det, params: dict) -> torch.device:
    """Hand the networks that this call runs (`NetworkAnnotator.networks`) to ComfyUI's memory manager, which loads
    them onto its device; returns where the input should go."""
    if not isinstance(det, NetworkAnnotator):
        return torch.device("cpu")
    nets = det.networks(**params)
    comfy.model_management.load_models_gpu([_patcher(det, n) for n in nets])
    return det.device


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_OPTS = {"default": "fp32", "tooltip": (
    "Number format the network runs in. fp32 matches the reference annotators. bf16 is several times faster on CPUs "
    "with AMX (Intel Xeon 4th gen and later) and on recent GPUs; fp16 is faster on most GPUs. Half precision changes "
    "the maps slightly (in our tests soft edges and lines by at most 1.1/255 on average, 10/255 at any pixel) and may "
    "move line segments and keypoints by a pixel.")}


def run_annotator(key: str, image: torch.Tensor, resolution: int, pixel_perfect: bool, target_latent=None, chunk_size: Optional[int] = None,
                  precision: str = "fp32", **params):
    """IMAGE (B,H,W,C) -> (IMAGE, keypoints or None); the shared body of every annotator node."""
    info = registry.load_all()[key]
    if precision not in PRECISIONS:
        raise ValueError(f"{info.title}: precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    not_finite = [f"{k} is {v}" for k, v in params.items() if isinstance(v, float) and not math.isfinite(v)]
    if not_finite:  # NaN passes ComfyUI's min/max checks; OpenCV would fail deep inside, or quietly draw nothing
        raise AnnotatorError(f"{info.title}: {', '.join(not_finite)}; every setting must be a finite number.")
    x = as_rgb(image.movedim(-1, 1), info.title, sanitize=False)  # the one conversion; `prepare` sanitizes each chunk
    h, w = x.shape[-2:]
    res = pixel_perfect_resolution(h, w, resolution, pixel_perfect, target_latent)
    dh, dw = detect_size(h, w, res, 8)
    check_detect_size(info.title, h, w, res, (dh, dw), network=bool(info.weights))  # before any allocation
    dtype = PRECISIONS[precision] if info.weights else torch.float32
    det = registry.load(key, device=comfy.model_management.unet_offload_device(), dtype=dtype, dirs=annotator_dirs(), params=params)
    dev = _prepare_device(det, params)
    if chunk_size is None:  # a network: what its device runs fastest; OpenCV recipes: per image anyway
        chunk_size = default_chunk_size(dev) if info.weights else 8
    chunk_size = bounded_chunk_size(chunk_size, (dh, dw), network=bool(info.weights))
    if info.resolution is not None:
        params["resolution"] = res

    def prepare(part: torch.Tensor) -> torch.Tensor:
        """One chunk as the annotator takes it: at the detect size, clean, on the network's device."""
        if tuple(part.shape[-2:]) != (dh, dw):
            part = resize_to(sanitized(part), dh, dw)  # NaN must not spread in a resize
        if not det.sanitizes_input:
            part = sanitized(part)
        return part.to(dev)

    # one loop (the annotator's): chunk by chunk, maps back on the CPU, ComfyUI's progress bar moved after each chunk
    maps, keypoints = det.run(x, chunk_size=chunk_size, progress=comfy.utils.ProgressBar(x.shape[0]).update, prepare=prepare, **params)
    out = maps.float().movedim(1, -1).contiguous()  # no copy for float32 channels-last maps (the OpenCV annotators' own layout)
    return out, (keypoints if info.keypoints else None)


def _param_spec(p: registry.Param) -> tuple:
    opts = {"default": p.default, "tooltip": p.tooltip or p.name}
    if p.kind == "COMBO":
        return (list(p.choices), opts)
    for k in ("min", "max", "step"):
        if getattr(p, k) is not None:
            opts[k] = getattr(p, k)
    return (p.kind, opts)


RESOLUTION_TOOLTIP = "Detect resolution (short side). The output has this size, keeping the aspect ratio."
PIXEL_PERFECT = ("BOOLEAN", {"default": False, "tooltip": "Pick the resolution for you: the target latent's pixel size when connected, else the image's own."})
OPTIONAL = {"target_latent": ("LATENT", {"tooltip": "The latent the map is for; with pixel_perfect the map is made at its exact pixel size."})}


def resolution_inputs(res: registry.Param) -> dict:
    """The resolution and pixel_perfect widgets; default and limits are the annotator's (`AnnotatorInfo.resolution`)."""
    return {"resolution": ("INT", {"default": res.default, "min": res.min, "max": res.max, "step": res.step, "tooltip": RESOLUTION_TOOLTIP}),
            "pixel_perfect": PIXEL_PERFECT}


def common_resolution(infos) -> registry.Param:
    """What every annotator accepts, for the Any Annotator node: the tightest limits, the most common default and step."""
    params = [i.resolution for i in infos if i.resolution is not None]
    default = max({p.default for p in params}, key=[p.default for p in params].count)
    step = max({p.step for p in params}, key=[p.step for p in params].count)
    lo, hi = max(p.min for p in params), min(p.max for p in params)
    return registry.Param("resolution", "INT", min(max(default, lo), hi), min=lo, max=hi, step=step)


def make_node(info: registry.AnnotatorInfo) -> type:
    own = {p.name: _param_spec(p) for p in info.params if p.name != "resolution"}
    res = info.resolution
    has_res = res is not None

    class AnnotatorNode:
        DESCRIPTION = (info.description or info.title) + (f" Weights: {', '.join(info.weights)} in models/annotators. Licence: {info.licence}." if info.weights else "")
        FUNCTION = "run"
        RETURN_TYPES = ("IMAGE", "POSE_KEYPOINT") if info.keypoints else ("IMAGE",)
        RETURN_NAMES = ("image", "keypoints") if info.keypoints else ("image",)

        @classmethod
        def INPUT_TYPES(cls):
            req = {"image": ("IMAGE", {"tooltip": "Image batch (video frames too) to annotate."}), **own}
            if has_res:
                req.update(resolution_inputs(res))
            opt = dict(OPTIONAL) if has_res else {}
            if info.weights:  # networks only; an optional widget keeps older saved workflows loading
                opt["precision"] = (list(PRECISIONS), PRECISION_OPTS)
            return {"required": req, "optional": opt}

        def run(self, image, resolution=res.default if has_res else DEFAULT_RESOLUTION, pixel_perfect=False, target_latent=None, **params):
            out, kp = run_annotator(info.key, image, resolution, pixel_perfect, target_latent, **params)
            return (out, kp) if info.keypoints else (out,)

    AnnotatorNode.CATEGORY = CATEGORY
    AnnotatorNode.__name__ = AnnotatorNode.__qualname__ = f"Annotator_{info.key}"
    return AnnotatorNode


class AnyAnnotator:
    DESCRIPTION = "Runs any of the suite's annotators, picked from a list, with its default settings."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls):
        infos = registry.load_all()
        keys = sorted(infos)
        return {"required": {"image": ("IMAGE", {"tooltip": "Image batch to annotate."}),
                             "annotator": (keys, {"default": "canny" if "canny" in keys else keys[0], "tooltip": "Which annotator to run."}),
                             **resolution_inputs(common_resolution(infos.values()))},
                "optional": dict(OPTIONAL)}

    def run(self, image, annotator, resolution=DEFAULT_RESOLUTION, pixel_perfect=False, target_latent=None):
        return (run_annotator(annotator, image, resolution, pixel_perfect, target_latent)[0],)


class InpaintHint:
    DESCRIPTION = "Prepares the input of inpaint ControlNets: the image with the masked pixels set to -1."
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "The image to inpaint."}),
                             "mask": ("MASK", {"tooltip": "White (1) where new content should be generated."})}}

    def run(self, image, mask):
        from ..annotators.classical import inpaint_hint

        return (inpaint_hint(image.movedim(-1, 1), mask).movedim(1, -1).contiguous(),)


def node_mappings() -> tuple[dict, dict]:
    classes, names = {}, {}
    for key, info in sorted(registry.load_all().items()):
        node_id = f"ControlNetSuiteAnnotator_{key}"
        classes[node_id] = make_node(info)
        names[node_id] = f"{info.title} (Suite)"
    classes["ControlNetSuiteAnyAnnotator"] = AnyAnnotator
    names["ControlNetSuiteAnyAnnotator"] = "Any Annotator (Suite)"
    classes["ControlNetSuiteInpaintHint"] = InpaintHint
    names["ControlNetSuiteInpaintHint"] = "Inpaint Hint (Suite)"
    return classes, names
