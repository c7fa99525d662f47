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
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "SolidMask": ([], [("MASK", "MASK")]),
    "MaskComposite": ([("destination", "MASK"), ("source", "MASK")], [("MASK", "MASK")]),
    "ControlNetSuiteTrain": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")], [("control_net", "CONTROL_NET")]),
}
OPTIONAL = {("ControlNetSuiteLoader", "model"), ("ControlNetSuiteApply", "mask"), ("ControlNetSuiteApply", "vae"),
            ("ControlNetSuiteStack", "mask"), ("ControlNetSuiteStack", "stack"), ("ControlNetSuiteApplyStack", "vae")}


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
        self.nodes.append(n)
        return nid

    def save(self, name: str) -> None:
        for n in self.nodes:
            for o in n["outputs"]:
                if not o["links"]:
                    o["links"] = None
        data = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "info": {"title": self.title}}, "version": 0.4}
        (OUT / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


CKPT = "v1-5-pruned-emaonly.safetensors"
NEG = "lowres, blurry, worst quality, watermark"


def common(w: Workflow, prompt: str):
    ckpt = w.node("CheckpointLoaderSimple", [CKPT], (0, 0))
    pos = w.node("CLIPTextEncode", [prompt], (360, -200), title="Positive prompt", clip=(ckpt, 1))
    neg = w.node("CLIPTextEncode", [NEG], (360, 0), title="Negative prompt", clip=(ckpt, 1))
    return ckpt, pos, neg


def sample(w: Workflow, ckpt: int, pos: tuple, neg: tuple, prefix: str, seed: int = 42):
    latent = w.node("EmptyLatentImage", [512, 512, 1], (1100, 300))
    ks = w.node("KSampler", [seed, "fixed", 20, 7.0, "euler", "normal", 1.0], (1500, 0), model=(ckpt, 0), positive=pos, negative=neg, latent_image=(latent, 0))
    dec = w.node("VAEDecode", [], (1850, 0), samples=(ks, 0), vae=(ckpt, 2))
    w.node("SaveImage", [prefix], (2100, 0), images=(dec, 0))


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
    pose_cn = w.node("ControlNetSuiteLoader", ["control_v11p_sd15_openpose.safetensors", "auto"], (360, 300))
    canny_cn = w.node("ControlNetSuiteLoader", ["control_v11p_sd15_canny.safetensors", "auto"], (360, 850))
    s1 = w.node("ControlNetSuiteStack", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 300), control_net=(pose_cn, 0), image=(pose_img, 0))
    s2 = w.node("ControlNetSuiteStack", [0.6, 0.0, 0.8, "balanced", "crop and resize"], (760, 650), control_net=(canny_cn, 0), image=(edges, 0), stack=(s1, 0))
    app = w.node("ControlNetSuiteApplyStack", [], (1100, 0), positive=(pos, 0), negative=(neg, 0), stack=(s2, 0))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_multi")
    w.save("multi_control_pose_canny")


def regional():
    w = Workflow("Regional control: a different ControlNet unit in each half")
    ckpt, pos, neg = common(w, "two houses side by side, watercolor")
    left_img = w.node("LoadImage", ["scribble_example.png", "image"], (0, 300), title="Scribble (left half)")
    right_img = w.node("LoadImage", ["depth_example.png", "image"], (0, 650), title="Depth (right half)")
    cn_scr = w.node("ControlNetSuiteLoader", ["control_v11p_sd15_scribble.safetensors", "auto"], (360, 300))
    cn_dep = w.node("ControlNetSuiteLoader", ["control_v11f1p_sd15_depth.safetensors", "auto"], (360, 650))
    empty = w.node("SolidMask", [0.0, 512, 512], (0, 1000), title="Empty 512x512")
    half = w.node("SolidMask", [1.0, 256, 512], (0, 1150), title="Half 256x512")
    left = w.node("MaskComposite", [0, 0, "add"], (360, 1000), title="Left half", destination=(empty, 0), source=(half, 0))
    right = w.node("MaskComposite", [256, 0, "add"], (360, 1200), title="Right half", destination=(empty, 0), source=(half, 0))
    s1 = w.node("ControlNetSuiteStack", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 300), control_net=(cn_scr, 0), image=(left_img, 0), mask=(left, 0))
    s2 = w.node("ControlNetSuiteStack", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 650), control_net=(cn_dep, 0), image=(right_img, 0), mask=(right, 0), stack=(s1, 0))
    app = w.node("ControlNetSuiteApplyStack", [], (1100, 0), positive=(pos, 0), negative=(neg, 0), stack=(s2, 0))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_regional")
    w.save("regional_two_masked_units")


def train():
    """Train a ControlNet on a folder, then try it at once: the trained CONTROL_NET feeds the apply node directly."""
    w = Workflow("Train a ControlNet on a dataset folder, then sample with it")
    ckpt, pos, neg = common(w, "a red circle on a blue background")
    # dataset_folder, steps, learning_rate, batch_size, empty_prompt_rate, resolution, seed, (control_after_generate),
    # output_name, resume, annotator, precision, gradient_checkpointing
    trained = w.node("ControlNetSuiteTrain", ["controlnet_dataset", 1000, 1e-5, 4, 0.5, 512, 0, "fixed", "my_controlnet", True, "none",
                                              "auto", True], (360, 300), model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2))
    img = w.node("LoadImage", ["condition_example.png", "image"], (360, 750), title="A condition to try it on")
    app = w.node("ControlNetSuiteApply", [1.0, 0.0, 1.0, "balanced", "crop and resize"], (760, 0), positive=(pos, 0), negative=(neg, 0),
                 control_net=(trained, 0), image=(img, 0))
    sample(w, ckpt, (app, 0), (app, 1), "controlnet_trained")
    w.save("train_controlnet")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    single("canny", "Canny edges (ComfyUI's Canny node) -> ControlNet", "a cozy living room, photo, detailed", "control_v11p_sd15_canny.safetensors",
           "canny_example.png", canny=True)
    single("scribble", "Scribble -> ControlNet", "a cat sitting on a fence, illustration", "control_v11p_sd15_scribble.safetensors", "scribble_example.png")
    single("pose", "OpenPose skeleton -> ControlNet", "an astronaut dancing, full body, photo", "control_v11p_sd15_openpose.safetensors", "pose_example.png")
    single("depth", "Depth map -> ControlNet", "a stone bridge over a river, fantasy painting", "control_v11f1p_sd15_depth.safetensors", "depth_example.png")
    single("segmentation", "ADE20K segmentation map -> ControlNet", "a modern kitchen, interior photo", "control_v11p_sd15_seg.safetensors",
           "segmentation_example.png", resize="resize and pad")
    for mode, slug in (("balanced", "balanced"), ("prompt is more important", "prompt_more_important"),
                       ("ControlNet is more important", "controlnet_more_important"), ("CFG resolution weighting", "cfg_resolution_weighting")):
        single(f"mode_{slug}", f"Control mode: {mode}", "a lighthouse on a cliff, oil painting", "control_v11p_sd15_canny.safetensors",
               "canny_example.png", canny=True, mode=mode)
    multi()
    regional()
    train()


if __name__ == "__main__":
    main()
