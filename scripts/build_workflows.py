"""Writes the UI-format (litegraph 0.4) workflows in workflows/. Run: python scripts/build_workflows.py

The files are the product (users drag them into ComfyUI); this script keeps their node layout,
links and widget values consistent. Widget values follow each node's INPUT_TYPES order, with the
frontend's extra `control_after_generate` value after KSampler's seed and LoadImage's upload value.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"

# node type -> (inputs [(name, type)], outputs [(name, type)])
SOCKETS = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "Canny": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "ControlNetSuiteLoader": ([("model", "MODEL")], [("control_net", "CONTROL_NET")]),
    "ControlNetSuiteApply": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("control_net", "CONTROL_NET"), ("image", "IMAGE"),
                              ("mask", "MASK"), ("vae", "VAE")], [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "ControlNetSuiteStack": ([("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("mask", "MASK"), ("stack", "CONTROL_NET_STACK")],
                             [("stack", "CONTROL_NET_STACK")]),
    "ControlNetSuiteApplyStack": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("stack", "CONTROL_NET_STACK"), ("vae", "VAE")],
                                  [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")]),
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "ModelPatchLoader": ([], [("MODEL_PATCH", "MODEL_PATCH")]),
    "ModelSamplingAuraFlow": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "ControlNetSuiteApplyPatch": ([("model", "MODEL"), ("vae", "VAE"), ("image", "IMAGE"), ("patch", "MODEL_PATCH"), ("control_net", "CONTROL_NET"),
                                   ("mask", "MASK"), ("inpaint_mask", "MASK")], [("model", "MODEL")]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "SolidMask": ([], [("MASK", "MASK")]),
    "MaskComposite": ([("destination", "MASK"), ("source", "MASK")], [("MASK", "MASK")]),
    "ControlNetSuiteTrain": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")], [("control_net", "CONTROL_NET")]),
    "ControlNetSuiteUnion": ([("control_net", "CONTROL_NET"), ("image_2", "IMAGE"), ("image_3", "IMAGE")], [("control_net", "CONTROL_NET")]),
}
OPTIONAL = {("ControlNetSuiteLoader", "model"), ("ControlNetSuiteApply", "mask"), ("ControlNetSuiteApply", "vae"),
            ("ControlNetSuiteStack", "mask"), ("ControlNetSuiteStack", "stack"), ("ControlNetSuiteApplyStack", "vae"),
            ("ControlNetSuiteUnion", "image_2"), ("ControlNetSuiteUnion", "image_3"), ("ControlNetSuiteApplyPatch", "patch"),
            ("ControlNetSuiteApplyPatch", "control_net"), ("ControlNetSuiteApplyPatch", "mask"), ("ControlNetSuiteApplyPatch", "inpaint_mask")}

# Where each loader's files live (the host's model folder names) and the published files the workflows name.
# Why: a newcomer opening a workflow without the models gets the frontend's missing-models dialog, which offers a
# download only for what a node declares in properties["models"] ({name, url, directory}; the entry must name the
# file the node's widget holds), from an allowed host (https://huggingface.co/ ...) and for a .safetensors name.
# The file names and URLs are those of ComfyUI's own SD1.5 templates: a user who ran those already has the files.
LOADER_DIRECTORY = {"CheckpointLoaderSimple": "checkpoints", "ControlNetSuiteLoader": "controlnet", "UNETLoader": "diffusion_models",
                    "DualCLIPLoader": "text_encoders", "VAELoader": "vae", "CLIPLoader": "text_encoders", "ModelPatchLoader": "model_patches"}
HF_CONTROLNET = "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
CN_CANNY, CN_SCRIBBLE, CN_POSE, CN_DEPTH, CN_SEG = (f"control_{k}_fp16.safetensors" for k in (
    "v11p_sd15_canny", "v11p_sd15_scribble", "v11p_sd15_openpose", "v11f1p_sd15_depth", "v11p_sd15_seg"))
CKPT_XL = "sd_xl_base_1.0.safetensors"
CN_UNION = "diffusion_pytorch_model_promax.safetensors"  # xinsir's ProMax union file, under its published name
# SD3.5 Large and Stability's canny ControlNet, under the names and downloads of ComfyUI's own SD3.5 canny template
CKPT_SD35 = "sd3.5_large_fp8_scaled.safetensors"
CN_SD35_CANNY = "sd3.5_large_controlnet_canny.safetensors"
# Flux.1 dev as ComfyUI's own Flux templates load it, and Shakker-Labs' Union Pro 2.0 (one file for canny, soft edge,
# depth, pose and gray; no mode to set), under its published name
FLUX_UNET, FLUX_CLIP_L, FLUX_T5, FLUX_VAE = "flux1-dev-fp8.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"
CN_FLUX_UNION = "diffusion_pytorch_model.safetensors"
# Qwen-Image and its ControlNets under the names and downloads of ComfyUI's own Qwen-Image ControlNet templates
QWEN_UNET, QWEN_CLIP, QWEN_VAE = "qwen_image_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image_vae.safetensors"
CN_QWEN_UNION = "Qwen-Image-InstantX-ControlNet-Union.safetensors"
PATCH_QWEN_CANNY = "qwen_image_canny_diffsynth_controlnet.safetensors"
_QWEN = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
# Z-Image Turbo and alibaba-pai's Fun ControlNet union under the names and downloads of ComfyUI's own Z-Image template
# (its VAE is the Flux one, `ae.safetensors`, above)
ZIMAGE_UNET, ZIMAGE_CLIP = "z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors"
CN_ZIMAGE = "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"
_ZIMAGE = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/"
MODEL_URLS = {CKPT: "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/" + CKPT,
              **{cn: HF_CONTROLNET + cn for cn in (CN_CANNY, CN_SCRIBBLE, CN_POSE, CN_DEPTH, CN_SEG)},
              CKPT_XL: "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/" + CKPT_XL,
              CN_UNION: "https://huggingface.co/xinsir/controlnet-union-sdxl-1.0/resolve/main/" + CN_UNION,
              CKPT_SD35: "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/" + CKPT_SD35,
              CN_SD35_CANNY: "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-controlnets_ComfyUI_repackaged/resolve/main/"
                             "split_files/controlnet/" + CN_SD35_CANNY,
              FLUX_UNET: "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/" + FLUX_UNET,
              FLUX_CLIP_L: "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/" + FLUX_CLIP_L,
              FLUX_T5: "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/" + FLUX_T5,
              FLUX_VAE: "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/" + FLUX_VAE,
              CN_FLUX_UNION: "https://huggingface.co/Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro-2.0/resolve/main/" + CN_FLUX_UNION,
              QWEN_UNET: _QWEN + "diffusion_models/" + QWEN_UNET, QWEN_CLIP: _QWEN + "text_encoders/" + QWEN_CLIP, QWEN_VAE: _QWEN + "vae/" + QWEN_VAE,
              CN_QWEN_UNION: "https://huggingface.co/Comfy-Org/Qwen-Image-InstantX-ControlNets/resolve/main/split_files/controlnet/" + CN_QWEN_UNION,
              PATCH_QWEN_CANNY: "https://huggingface.co/Comfy-Org/Qwen-Image-DiffSynth-ControlNets/resolve/main/split_files/model_patches/"
                                + PATCH_QWEN_CANNY,
              ZIMAGE_UNET: _ZIMAGE + "diffusion_models/" + ZIMAGE_UNET, ZIMAGE_CLIP: _ZIMAGE + "text_encoders/" + ZIMAGE_CLIP,
              CN_ZIMAGE: "https://huggingface.co/alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union/resolve/main/" + CN_ZIMAGE}


def published_models(type_: str, widgets: list) -> list[dict]:
    """The frontend's model metadata for a loader node: one entry per published file its widgets name."""
    if type_ not in LOADER_DIRECTORY:
        return []
    return [{"name": v, "url": MODEL_URLS[v], "directory": LOADER_DIRECTORY[type_]} for v in widgets if v in MODEL_URLS]


def fit(boxes: list[tuple], area: tuple) -> dict:
    """The view (LiteGraph ds) that centres the boxes' hull (graph units) in `area` (window px), at most 1:1."""
    left, top, right, bottom = area
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = int(min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0), 1.0) * 1000) / 1000  # rounded down
    sx = left + ((right - left) - (x1 - x0) * scale) / 2  # where the hull's top-left corner lands on the screen
    sy = top + ((bottom - top) - (y1 - y0) * scale) / 2
    return {"scale": scale, "offset": [round(sx / scale - x0, 1), round(sy / scale - y0, 1)]}


def screen(box: tuple, ds: dict) -> tuple:
    (ox, oy), k = ds["offset"], ds["scale"]
    return ((box[0] + ox) * k, (box[1] + oy) * k, (box[2] + ox) * k, (box[3] + oy) * k)


def overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class Workflow:
    def __init__(self, title: str):
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, widgets: list, pos: tuple, title: str | None = None, **links) -> int:
        nid = len(self.nodes) + 1
        ins, outs = SOCKETS[type_]
        inputs = []
        for name, typ in ins:
            src = links.get(name)
            if src is None and (type_, name) not in OPTIONAL:
                raise ValueError(f"{type_}.{name} is required")
            if src is None:
                inputs.append({"name": name, "type": typ, "link": None, "shape": 7})
                continue
            lid = len(self.links) + 1
            origin, slot = src
            self.links.append([lid, origin, slot, nid, len(inputs), typ])
            self.nodes[origin - 1]["outputs"][slot]["links"].append(lid)
            inputs.append({"name": name, "type": typ, "link": lid})
        n = {
            "id": nid, "type": type_, "pos": list(pos), "size": [320, 60 + 26 * (len(widgets) + max(len(ins), len(outs)))],
            "flags": {}, "order": nid - 1, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": typ, "links": [], "slot_index": i} for i, (name, typ) in enumerate(outs)],
            "properties": {"Node name for S&R": type_}, "widgets_values": widgets,
        }
        if title:
            n["title"] = title
        models = published_models(type_, widgets)
        if models:
            n["properties"]["models"] = models
        self.nodes.append(n)
        return nid

    def save(self, name: str) -> None:
        for n in self.nodes:
            for o in n["outputs"]:
                if not o["links"]:
                    o["links"] = None
        # The view the workflow opens with (extra.ds; screen = (graph + offset) * scale). The frontend (1.x,
        # app.loadGraphData) restores a file's extra.ds as it is (setting Comfy.EnableWorkflowViewRestore, on by default)
        # and fits the view to the nodes only when there is none; the 2024 frontend restores nothing. So ds is computed:
        # it centres the nodes' bounding box (title bars included: LiteGraph draws them above `pos`) in the part of a
        # 1280x800 window that the docked UI leaves free (sidebar on the left; banner, tabs and toolbar on top), and
        # keeps every node off the minimap and the canvas menu in the bottom right corner (shown by default).
        # tests/test_browser.py checks it in a real browser at that size.
        # A LoadImage node grows once its picture shows: the preview asks for at least 220 px, which makes the node
        # ~314 px high (measured in frontend 1.32.9 and the 2024 one).
        title = 30
        height = {n["id"]: max(n["size"][1], 314 if n["type"] == "LoadImage" else 0) for n in self.nodes}
        boxes = [(n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + height[n["id"]]) for n in self.nodes]
        free, corner = (70, 140, 1260, 780), (1022, 543)  # window px: free for the graph; where the minimap starts (1.32.9: 1024, 545)
        ds = fit(boxes, free)
        if any(overlaps(screen(b, ds), (*corner, 1280, 800)) for b in boxes):  # then the better of: left of it, above it
            ds = max((fit(boxes, (70, 140, corner[0], 780)), fit(boxes, (70, 140, 1260, corner[1]))), key=lambda d: d["scale"])
        data = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links,
                "groups": [], "config": {}, "extra": {"ds": ds, "info": {"title": self.title}}, "version": 0.4}
        (OUT / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


NEG = "lowres, blurry, worst quality, watermark"


def common(w: Workflow, prompt: str, ckpt_file: str = CKPT):
    ckpt = w.node("CheckpointLoaderSimple", [ckpt_file], (0, 0))
    pos = w.node("CLIPTextEncode", [prompt], (360, -200), title="Positive prompt", clip=(ckpt, 1))
    neg = w.node("CLIPTextEncode", [NEG], (360, 0), title="Negative prompt", clip=(ckpt, 1))
    return ckpt, pos, neg


def sample(w: Workflow, ckpt: int, pos: tuple, neg: tuple, prefix: str, seed: int = 42, x: int = 1110,
           latent_at: tuple = (760, 410), size: int = 512, latent: str = "EmptyLatentImage", settings: tuple = (20, 7.0, "euler", "normal")):
    """Sampler column at x, decode and save beside it, the empty latent under the apply node: compact, and the bottom
    right corner (where the frontend shows its minimap) left free, so the fitted view stays above the zoom at which
    the frontend stops drawing node text (8/14 by default)."""
    empty = w.node(latent, [size, size, 1], latent_at)
    ks = w.node("KSampler", [seed, "fixed", *settings, 1.0], (x, 0), model=(ckpt, 0), positive=pos, negative=neg, latent_image=(empty, 0))
    dec = w.node("VAEDecode", [], (x + 360, 0), samples=(ks, 0), vae=(ckpt, 2))
    w.node("SaveImage", [prefix], (x + 360, 160), images=(dec, 0))


def single(name: str, title: str, prompt: str, cn_file: str, image_file: str, *, canny: bool = False, mode: str = "balanced",
           strength: float = 1.0, resize: str = "crop and resize"):
    w = Workflow(title)
    ckpt, pos, neg = common(w, prompt)
    img = w.node("LoadImage", [image_file, "image"], (0, 300), title="Condition image" if not canny else "Photo")
    hint = (img, 0)
    if canny:
        hint = (w.node("Canny", [0.4, 0.8], (360, 300), image=(img, 0)), 0)
    cn = w.node("ControlNetSuiteLoader", [cn_file, "auto"], (360, 500))
    app = w.node("ControlNetSuiteApply", [strength, 0.0, 1.0, mode, resize], (760, 0), positive=(pos, 0), negative=(neg, 0), control_net=(cn, 0), image=hint)
    sample(w, ckpt, (app, 0), (app, 1), f"controlnet_{name}")
    w.save(name)


def multi():
    w = Workflow("Pose + canny (two ControlNets, residuals added)")
    ckpt, pos, neg = common(w, "a dancer on a rooftop at sunset, detailed, photo")
    pose_img = w.node("LoadImage", ["pose_example.png", "image"], (0, 300), title="OpenPose image")
    photo = w.node("LoadImage", ["canny_example.png", "image"], (0, 650), title="Photo for edges")
    edges = w.node("Canny", [0.4, 0.8], (360, 650), image=(photo, 0))
    pose_cn = w.node("ControlNetSuiteLoader", [CN_POSE, "auto"], (360, 300))
    canny_cn = w.node("ControlNetSuiteLoader", [CN_CANNY, "auto"], (360, 850))
    s1 = w.node("ControlNetSuiteStack", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 300), control_net=(pose_cn, 0), image=(pose_img, 0))
    s2 = w.node("ControlNetSuiteStack", [0.6, 0.0, 0.8, "balanced", "crop and resize"], (760, 650), control_net=(canny_cn, 0), image=(edges, 0), stack=(s1, 0))
    app = w.node("ControlNetSuiteApplyStack", [], (1100, 0), positive=(pos, 0), negative=(neg, 0), stack=(s2, 0))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_multi", x=1460, latent_at=(1100, 230))
    w.save("multi_control_pose_canny")


def regional():
    w = Workflow("Regional control: a different ControlNet unit in each half")
    ckpt, pos, neg = common(w, "two houses side by side, watercolor")
    left_img = w.node("LoadImage", ["scribble_example.png", "image"], (0, 300), title="Scribble (left half)")
    right_img = w.node("LoadImage", ["depth_example.png", "image"], (0, 650), title="Depth (right half)")
    cn_scr = w.node("ControlNetSuiteLoader", [CN_SCRIBBLE, "auto"], (360, 300))
    cn_dep = w.node("ControlNetSuiteLoader", [CN_DEPTH, "auto"], (360, 650))
    empty = w.node("SolidMask", [0.0, 512, 512], (0, 1000), title="Empty 512x512")
    half = w.node("SolidMask", [1.0, 256, 512], (0, 1200), title="Half 256x512")
    left = w.node("MaskComposite", [0, 0, "add"], (360, 1000), title="Left half", destination=(empty, 0), source=(half, 0))
    right = w.node("MaskComposite", [256, 0, "add"], (360, 1230), title="Right half", destination=(empty, 0), source=(half, 0))
    s1 = w.node("ControlNetSuiteStack", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 300), control_net=(cn_scr, 0), image=(left_img, 0), mask=(left, 0))
    s2 = w.node("ControlNetSuiteStack", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 650), control_net=(cn_dep, 0), image=(right_img, 0), mask=(right, 0), stack=(s1, 0))
    app = w.node("ControlNetSuiteApplyStack", [], (1100, 0), positive=(pos, 0), negative=(neg, 0), stack=(s2, 0))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_regional", x=1460, latent_at=(1100, 230))
    w.save("regional_two_masked_units")


def union():
    """SDXL union: pose and depth through one ControlNet Union (Suite) unit, fused in one forward pass."""
    w = Workflow("SDXL union (ProMax): pose + depth in one ControlNet pass")
    ckpt, pos, neg = common(w, "a dancer in a sunlit stone courtyard, photo, detailed", CKPT_XL)
    pose_img = w.node("LoadImage", ["pose_example.png", "image"], (0, 300), title="OpenPose image")
    depth_img = w.node("LoadImage", ["depth_example.png", "image"], (0, 650), title="Depth map")
    cn = w.node("ControlNetSuiteLoader", [CN_UNION, "auto"], (360, 300), title="Union ControlNet (xinsir ProMax)")
    # type, weight, type_2, weight_2, type_3, weight_3 (image_3 unconnected)
    uni = w.node("ControlNetSuiteUnion", ["openpose", 1.0, "depth", 0.7, "openpose", 1.0], (360, 500), control_net=(cn, 0),
                 image_2=(depth_img, 0))
    app = w.node("ControlNetSuiteApply", [0.9, 0.0, 0.9, "balanced", "crop and resize"], (760, 0), positive=(pos, 0), negative=(neg, 0),
                 control_net=(uni, 0), image=(pose_img, 0))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_sdxl_union", size=1024)
    w.save("sdxl_union_pose_depth")


def sd35_canny():
    """SD3.5 Large with Stability's canny ControlNet, through the suite's nodes: the VAE goes to the apply node (these
    ControlNets read the condition image as a latent); sampler settings as in ComfyUI's own SD3.5 canny template."""
    w = Workflow("SD3.5 Large canny (Stability's ControlNet) with the suite's nodes")
    ckpt = w.node("CheckpointLoaderSimple", [CKPT_SD35], (0, 0))
    pos = w.node("CLIPTextEncode", ["a crystal pink dragon under a blue night sky, hyperdetailed"], (360, -200), title="Positive prompt",
                 clip=(ckpt, 1))
    neg = w.node("ConditioningZeroOut", [], (360, 0), title="Empty negative", conditioning=(pos, 0))
    photo = w.node("LoadImage", ["canny_example.png", "image"], (0, 300), title="Photo")
    edges = w.node("Canny", [0.3, 0.6], (360, 300), image=(photo, 0))
    cn = w.node("ControlNetSuiteLoader", [CN_SD35_CANNY, "auto"], (360, 500))
    app = w.node("ControlNetSuiteApply", [0.66, 0.0, 1.0, "balanced", "crop and resize"], (760, 0), positive=(pos, 0), negative=(neg, 0),
                 control_net=(cn, 0), image=(edges, 0), vae=(ckpt, 2))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_sd35_canny", size=1024, latent="EmptySD3LatentImage", settings=(32, 4.5, "euler", "simple"))
    w.save("sd35_large_canny")


def flux_union():
    """Flux.1 dev with a union ControlNet (Union Pro 2.0) through the suite's loader and apply node: a depth map steers the
    left two thirds of the image only (a region mask on the token grid), control ends at 80% of the steps."""
    w = Workflow("Flux union ControlNet (Union Pro 2.0): depth on a masked region")
    unet = w.node("UNETLoader", [FLUX_UNET, "default"], (0, -260))
    clip = w.node("DualCLIPLoader", [FLUX_CLIP_L, FLUX_T5, "flux", "default"], (0, -80))
    vae = w.node("VAELoader", [FLUX_VAE], (0, 150))
    text = w.node("CLIPTextEncode", ["a stone bridge over a misty river at dawn, photo, detailed"], (360, -200), title="Prompt", clip=(clip, 0))
    pos = w.node("FluxGuidance", [3.5], (360, 0), conditioning=(text, 0))
    neg = w.node("ConditioningZeroOut", [], (360, 150), title="Empty negative", conditioning=(text, 0))
    depth = w.node("LoadImage", ["depth_example.png", "image"], (0, 300), title="Depth map")
    cn = w.node("ControlNetSuiteLoader", [CN_FLUX_UNION, "auto"], (360, 300), title="Flux union ControlNet (Union Pro 2.0)")
    empty = w.node("SolidMask", [0.0, 1024, 1024], (0, 650), title="Empty 1024x1024")
    part = w.node("SolidMask", [1.0, 680, 1024], (0, 850), title="Left 680x1024")
    region = w.node("MaskComposite", [0, 0, "add"], (360, 650), title="Left two thirds", destination=(empty, 0), source=(part, 0))
    app = w.node("ControlNetSuiteApply", [0.7, 0.0, 0.8, "balanced", "crop and resize"], (760, 0), positive=(pos, 0), negative=(neg, 0),
                 control_net=(cn, 0), image=(depth, 0), mask=(region, 0), vae=(vae, 0))
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1], (760, 410))
    ks = w.node("KSampler", [42, "fixed", 24, 1.0, "euler", "simple", 1.0], (1110, 0), model=(unet, 0), positive=(app, 0), negative=(app, 1),
                latent_image=(latent, 0))
    dec = w.node("VAEDecode", [], (1470, 0), samples=(ks, 0), vae=(vae, 0))
    w.node("SaveImage", ["controlnet_flux_union"], (1470, 160), images=(dec, 0))
    w.save("flux_union_depth_region")


def _qwen_base(w: Workflow, prompt: str):
    unet = w.node("UNETLoader", [QWEN_UNET, "default"], (0, -260))
    clip = w.node("CLIPLoader", [QWEN_CLIP, "qwen_image", "default"], (0, -80))
    vae = w.node("VAELoader", [QWEN_VAE], (0, 125))
    pos = w.node("CLIPTextEncode", [prompt], (360, -260), title="Prompt", clip=(clip, 0))
    neg = w.node("CLIPTextEncode", [" "], (360, -40), title="Negative prompt", clip=(clip, 0))
    photo = w.node("LoadImage", ["canny_example.png", "image"], (0, 270), title="Photo")
    edges = w.node("Canny", [0.1, 0.2], (360, 300), image=(photo, 0))
    return unet, vae, pos, neg, edges


def _qwen_sample(w: Workflow, model: tuple, pos: tuple, neg: tuple, vae: int, prefix: str, x: int = 1110):
    latent = w.node("EmptySD3LatentImage", [1328, 1328, 1], (760, 410))
    shifted = w.node("ModelSamplingAuraFlow", [3.1], (760, 620), model=model)
    ks = w.node("KSampler", [42, "fixed", 20, 2.5, "euler", "simple", 1.0], (x, 0), model=(shifted, 0), positive=pos, negative=neg,
                latent_image=(latent, 0))
    dec = w.node("VAEDecode", [], (x + 360, 0), samples=(ks, 0), vae=(vae, 0))
    w.node("SaveImage", [prefix], (x + 360, 160), images=(dec, 0))


def qwen_instantx():
    """Qwen-Image with InstantX's union ControlNet (canny edges) through the suite's loader and apply node."""
    w = Workflow("Qwen-Image + InstantX union ControlNet (canny) with the suite's nodes")
    unet, vae, pos, neg, edges = _qwen_base(w, "a glass greenhouse in a snowy forest at dusk, photo, detailed")
    cn = w.node("ControlNetSuiteLoader", [CN_QWEN_UNION, "auto"], (360, 500))
    app = w.node("ControlNetSuiteApply", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 0), positive=(pos, 0), negative=(neg, 0),
                 control_net=(cn, 0), image=(edges, 0), vae=(vae, 0))
    _qwen_sample(w, (unet, 0), (app, 0), (app, 1), vae, "controlnet_qwen_instantx")
    w.save("qwen_image_instantx_canny")


def qwen_diffsynth():
    """Qwen-Image with DiffSynth's blockwise canny ControlNet: a model patch, through Apply ControlNet Patch (Suite)."""
    w = Workflow("Qwen-Image + DiffSynth canny model patch with the suite's patch node")
    unet, vae, pos, neg, edges = _qwen_base(w, "a glass greenhouse in a snowy forest at dusk, photo, detailed")
    patch = w.node("ModelPatchLoader", [PATCH_QWEN_CANNY], (360, 500))
    patched = w.node("ControlNetSuiteApplyPatch", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 0), model=(unet, 0), vae=(vae, 0),
                     image=(edges, 0), patch=(patch, 0))
    _qwen_sample(w, (patched, 0), (pos, 0), (neg, 0), vae, "controlnet_qwen_diffsynth")
    w.save("qwen_image_diffsynth_canny_patch")


def zimage_fun():
    """Z-Image Turbo with alibaba-pai's Fun ControlNet union (canny edges), a model patch: through Load ControlNet
    (Suite), which reads the file on every host (ComfyUI's own ModelPatchLoader knows it only from 0.8.0 on), and
    Apply ControlNet Patch (Suite). Turbo samples in 9 steps at cfg 1, so the negative is the prompt zeroed out."""
    w = Workflow("Z-Image Turbo + Fun ControlNet union (canny) with the suite's patch node")
    unet = w.node("UNETLoader", [ZIMAGE_UNET, "default"], (0, -260))
    clip = w.node("CLIPLoader", [ZIMAGE_CLIP, "lumina2", "default"], (0, -80))
    vae = w.node("VAELoader", [FLUX_VAE], (0, 125))
    pos = w.node("CLIPTextEncode", ["a wooden cabin by a mountain lake at sunrise, photo, detailed"], (360, -260), title="Prompt", clip=(clip, 0))
    neg = w.node("ConditioningZeroOut", [], (360, -40), title="Empty negative", conditioning=(pos, 0))
    photo = w.node("LoadImage", ["canny_example.png", "image"], (0, 270), title="Photo")
    edges = w.node("Canny", [0.1, 0.32], (360, 300), image=(photo, 0))
    cn = w.node("ControlNetSuiteLoader", [CN_ZIMAGE, "auto"], (360, 500), title="Z-Image Fun ControlNet union (in models/controlnet)")
    patched = w.node("ControlNetSuiteApplyPatch", [0.75, 0.0, 1.0, "balanced", "crop and resize"], (760, 0), model=(unet, 0), vae=(vae, 0),
                     image=(edges, 0), control_net=(cn, 0))
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1], (760, 410))
    shifted = w.node("ModelSamplingAuraFlow", [3.0], (760, 620), model=(patched, 0))
    ks = w.node("KSampler", [42, "fixed", 9, 1.0, "res_multistep", "simple", 1.0], (1110, 0), model=(shifted, 0), positive=(pos, 0),
                negative=(neg, 0), latent_image=(latent, 0))
    dec = w.node("VAEDecode", [], (1470, 0), samples=(ks, 0), vae=(vae, 0))
    w.node("SaveImage", ["controlnet_zimage_fun"], (1470, 160), images=(dec, 0))
    w.save("zimage_fun_canny_patch")


def train():
    """Train a ControlNet on a folder, then try it at once: the trained CONTROL_NET feeds the apply node directly."""
    w = Workflow("Train a ControlNet on a dataset folder, then sample with it")
    ckpt, pos, neg = common(w, "a red circle on a blue background")
    # dataset_folder, steps, learning_rate, batch_size, empty_prompt_rate, resolution, seed, (control_after_generate),
    # output_name, resume, annotator, precision, gradient_checkpointing, overwrite
    trained = w.node("ControlNetSuiteTrain", ["controlnet_dataset", 1000, 1e-5, 4, 0.5, 512, 0, "fixed", "my_controlnet", True, "none",
                                              "auto", True, False, "ControlNet and base UNet"], (360, 300), model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2))
    img = w.node("LoadImage", ["condition_example.png", "image"], (360, 880), title="A condition to try it on")
    app = w.node("ControlNetSuiteApply", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 0), positive=(pos, 0), negative=(neg, 0),
                 control_net=(trained, 0), image=(img, 0))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_trained")
    w.save("train_controlnet")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    single("canny", "Canny edges (ComfyUI's Canny node) -> ControlNet", "a cozy living room, photo, detailed", CN_CANNY,
           "canny_example.png", canny=True)
    single("scribble", "Scribble -> ControlNet", "a cat sitting on a fence, illustration", CN_SCRIBBLE, "scribble_example.png")
    single("pose", "OpenPose skeleton -> ControlNet", "an astronaut dancing, full body, photo", CN_POSE, "pose_example.png")
    single("depth", "Depth map -> ControlNet", "a stone bridge over a river, fantasy painting", CN_DEPTH, "depth_example.png")
    single("segmentation", "ADE20K segmentation map -> ControlNet", "a modern kitchen, interior photo", CN_SEG,
           "segmentation_example.png", resize="resize and pad")
    for mode, slug in (("balanced", "balanced"), ("prompt is more important", "prompt_more_important"),
                       ("ControlNet is more important", "controlnet_more_important"), ("CFG resolution weighting", "cfg_resolution_weighting")):
        single(f"mode_{slug}", f"Control mode: {mode}", "a lighthouse on a cliff, oil painting", CN_CANNY,
               "canny_example.png", canny=True, mode=mode)
    multi()
    regional()
    union()
    sd35_canny()
    flux_union()
    qwen_instantx()
    qwen_diffsynth()
    zimage_fun()
    train()


if __name__ == "__main__":
    main()
