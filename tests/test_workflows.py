"""Every shipped workflow converts as the frontend would, validates against the host and runs with tiny models."""
import json
import re
import sysconfig
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from clip_checkpoint import fp32_text_encoder, tiny_checkpoint_with_clip
from comfy_flux import CONTEXT as FLUX_CONTEXT
from comfy_flux import POOLED as FLUX_POOLED
from comfy_flux import instantx_file, tiny_flux
from comfy_qwen import CONTEXT as QWEN_CONTEXT
from comfy_qwen import instantx_file as qwen_instantx_file
from comfy_qwen import tiny_qwen
from comfy_zimage import CONTEXT as ZIMAGE_CONTEXT
from comfy_zimage import tiny_zimage, zimage_fun_file
from host import SD3_TINY, TINY_SD3_CHECKPOINT, Host, make_tiny_sd3_checkpoint, tiny_sd35_controlnet, tiny_union_file
from PIL import Image
from ui_workflow import ui_to_api

from controlnet_core.train.toy import make_fill50k

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
REQUIRED = {"canny", "scribble", "pose", "depth", "segmentation", "multi_control_pose_canny", "regional_two_masked_units",
            "mode_balanced", "mode_prompt_more_important", "mode_controlnet_more_important", "mode_cfg_resolution_weighting",
            "train_controlnet", "sdxl_union_pose_depth", "sd35_large_canny", "flux_union_depth_region", "qwen_image_instantx_canny",
            "qwen_image_diffsynth_canny_patch", "zimage_fun_canny_patch"}


def test_all_required_workflows_are_shipped():
    assert REQUIRED <= {p.stem for p in WORKFLOWS}


def test_workflows_are_litegraph_0_4():
    for p in WORKFLOWS:
        wf = json.loads(p.read_text())
        assert {"last_node_id", "last_link_id", "nodes", "links", "version"} <= wf.keys(), p.name
        for n in wf["nodes"]:
            assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= n.keys(), (p.name, n["id"])
        for l in wf["links"]:
            assert len(l) == 6


def test_no_node_covers_another():
    """Boxes as the file gives them, each with the 30 px title bar LiteGraph draws above `pos`."""
    for p in WORKFLOWS:
        boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in json.loads(p.read_text())["nodes"]]
        overlapping = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]
        assert not overlapping, (p.name, overlapping)


# The loaders whose widgets name model files, and the host model folder each reads (the frontend's `directory`).
LOADERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetSuiteLoader": "controlnet", "UNETLoader": "diffusion_models",
           "DualCLIPLoader": "text_encoders", "VAELoader": "vae", "CLIPLoader": "text_encoders", "ModelPatchLoader": "model_patches"}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def frontend_model_rules() -> dict:
    """What the installed frontend does with a node's model metadata, read from its own bundle (so a frontend that
    changes the rules fails this test): the model schema's fields (`required`: those without .optional()), and the
    missing-models dialog's allowed URL prefixes, file-name suffixes and individually allowed URLs."""
    pkg = pytest.importorskip("comfyui_frontend_package")
    found: dict = {}
    for js in sorted((Path(pkg.__file__).parent / "static" / "assets").glob("*.js")):
        text = js.read_text(errors="replace")
        dialog = re.search(r'__name:"MissingModelsWarning".{0,300}?=(\[[^\]]*\]),\w+=(\[[^\]]*\]),\w+=new Set\((\[[^\]]*\])\)', text, re.S)
        if dialog:
            found.update(prefixes=json.loads(dialog[1]), suffixes=json.loads(dialog[2]), exempt=set(json.loads(dialog[3])))
        schema = re.search(r"zModelFile=z\.object\(\{(.*?)\}\)", text)
        if schema:
            fields = dict(re.findall(r"(\w+):(z\.string\(\)[\w.()]*)", schema[1]))
            found.update(fields=set(fields), required={k for k, v in fields.items() if ".optional()" not in v})
        if "properties?.models" in text:
            found["reads_node_properties"] = True
    assert {"prefixes", "fields", "reads_node_properties"} <= found.keys(), f"the frontend bundle changed: found only {sorted(found)}"
    return found


def test_loader_nodes_carry_model_metadata_the_frontend_accepts(host):
    """Opening a workflow without its models, the frontend's missing-models dialog offers each file for download only
    from node properties.models entries whose name is the widget's value, with a known model folder and an allowed URL."""
    import folder_paths

    rules = frontend_model_rules()
    assert rules["required"] == {"name", "url", "directory"}, rules
    for p in WORKFLOWS:
        for n in json.loads(p.read_text())["nodes"]:
            where = (p.name, n["id"], n["type"])
            files = [v for v in n.get("widgets_values") or [] if isinstance(v, str) and v.endswith(MODEL_SUFFIXES)]
            if n["type"] not in LOADERS:
                assert not files and "models" not in n["properties"], where  # a new loader: add it to LOADERS
                continue
            models = n["properties"].get("models", [])
            assert files and [m["name"] for m in models] == files, where
            for m in models:
                assert rules["required"] <= m.keys() <= rules["fields"] and all(isinstance(v, str) for v in m.values()), where
                assert m["directory"] == LOADERS[n["type"]] and m["directory"] in folder_paths.folder_names_and_paths, where
                allowed = m["url"].startswith(tuple(rules["prefixes"])) and m["name"].endswith(tuple(rules["suffixes"]))
                assert allowed or m["url"] in rules["exempt"], (where, m["url"])
                url = urllib.parse.urlsplit(m["url"])  # the file itself (a Hugging Face resolve link), not a page about it
                assert url.scheme == "https" and re.fullmatch(r"/[\w.-]+/[\w.-]+/resolve/main/(.+/)?" + re.escape(m["name"]), url.path), m["url"]


def test_model_downloads_match_comfyuis_own_templates():
    """Where ComfyUI's own templates (installed with the host) name the same file, they name the same download."""
    theirs: dict[str, set] = {}
    for t in Path(sysconfig.get_paths()["purelib"]).glob("comfyui_workflow_templates*/templates/*.json"):
        for m in re.findall(r'\{[^{}]*"url": *"[^"]+"[^{}]*\}', t.read_text(errors="replace")):
            entry = json.loads(m)
            if "name" in entry:
                theirs.setdefault(entry["name"], set()).add(entry["url"].split("?")[0])
    if not theirs:
        pytest.skip("no ComfyUI workflow templates package installed")
    ours = {m["name"]: m["url"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"] for m in n["properties"].get("models", [])}
    shared = ours.keys() & theirs.keys()
    # which files the installed templates name depends on their version (those of ComfyUI 0.3.75 have the SD1.5
    # ControlNets too, 0.8.0's only the checkpoint); whatever both name must have the same download
    assert shared, sorted(ours)
    assert {k: ours[k] for k in shared if ours[k] not in theirs[k]} == {}


def _provide_flux(host: Host) -> None:
    if "flux" not in host.test_nodes.PROVIDED:
        parts = tiny_flux()
        host.test_nodes.PROVIDED["flux"] = (parts["model"], None, parts["vae"])


def _provide_qwen(host: Host) -> None:
    from test_qwen_patch import host_patch

    if "qwen" not in host.test_nodes.PROVIDED:
        parts = tiny_qwen()
        host.test_nodes.PROVIDED["qwen"] = (parts["model"], None, parts["vae"])
    host.test_nodes.PROVIDED_CONTROL.setdefault("workflow-patch", host_patch(False, 52))


def _provide_zimage(host: Host) -> None:
    if "zimage" not in host.test_nodes.PROVIDED:
        parts = tiny_zimage()
        host.test_nodes.PROVIDED["zimage"] = (parts["model"], None, parts["vae"])


def substitute(prompt: dict, host: Host) -> dict:
    """Tiny models and sizes in place of the real ones; CLIP text encoding (no CLIP in the tiny model) -> test conditioning.
    A training workflow gets the tiny checkpoint with a CLIP (the Train node encodes captions), a 2-pair dataset and 1 step."""
    tiny_cns = ["cn_a.safetensors", "cn_b.safetensors"]
    trains = any(n["class_type"] == "ControlNetSuiteTrain" for n in prompt.values())
    sd3 = any(n["class_type"] == "CheckpointLoaderSimple" and "sd3" in n["inputs"]["ckpt_name"] for n in prompt.values())
    flux = any(n["class_type"] == "UNETLoader" and "flux" in n["inputs"]["unet_name"] for n in prompt.values())
    qwen = any(n["class_type"] == "UNETLoader" and "qwen" in n["inputs"]["unet_name"] for n in prompt.values())
    zimage = any(n["class_type"] == "UNETLoader" and "z_image" in n["inputs"]["unet_name"] for n in prompt.values())
    if flux or qwen or zimage:  # tiny DiT bases built in-process (ComfyUI detects them only at full width): comfy_flux/qwen/zimage.py
        base_key = "flux" if flux else "qwen" if qwen else "zimage"
        {"flux": _provide_flux, "qwen": _provide_qwen, "zimage": _provide_zimage}[base_key](host)
        for nid in [nid for nid, n in prompt.items() if n["class_type"] in ("DualCLIPLoader", "CLIPLoader")]:
            del prompt[nid]  # its only consumers, the text encoders, become test conditioning below
        vaes = {nid for nid, n in prompt.items() if n["class_type"] == "VAELoader"}
        for nid in vaes:
            prompt[nid] = {"class_type": "SuiteTestProvided", "inputs": {"key": base_key}}
        for n in prompt.values():  # SuiteTestProvided gives (MODEL, CLIP, VAE): the VAE is its third output
            n["inputs"] = {k: ([v[0], 2] if isinstance(v, list) and v[0] in vaes else v) for k, v in n["inputs"].items()}
    k = 0
    for node in prompt.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple" and sd3:  # the tiny SD3 base (SD3.5 is the same MMDiT family)
            inp["ckpt_name"] = make_tiny_sd3_checkpoint(host.dirs["checkpoints"] / TINY_SD3_CHECKPOINT).name
        elif ct == "CheckpointLoaderSimple":
            inp["ckpt_name"] = tiny_checkpoint_with_clip(host) if trains else host.checkpoint
        elif ct == "ControlNetSuiteTrain":
            data = host.dirs["input"] / inp["dataset_folder"]
            if not data.exists():
                make_fill50k(data, n=2, size=64)
            inp.update(steps=1, batch_size=2, resolution=64, resume=False)
        elif ct == "ControlNetSuiteLoader" and flux:  # an InstantX-layout (latent hint) Flux ControlNet of the tiny width
            inp["control_net_name"] = instantx_file(host.dirs["controlnet"] / "flux_workflow_tiny.safetensors", seed=35).name
        elif ct == "ControlNetSuiteLoader" and zimage:  # alibaba-pai's 2.1 layout at the tiny width
            inp["control_net_name"] = zimage_fun_file(host.dirs["controlnet"] / "zimage_workflow_tiny.safetensors", "2.1", seed=66).name
        elif ct == "ControlNetSuiteLoader" and qwen:
            inp["control_net_name"] = qwen_instantx_file(host.dirs["controlnet"] / "qwen_workflow_tiny.safetensors", seed=45).name
        elif ct == "ControlNetSuiteLoader" and "union" in inp["control_net_name"].lower() + str(node.get("_meta", "")).lower():
            inp["control_net_name"] = tiny_union_file(host.dirs["controlnet"]).name
        elif ct == "UNETLoader" and (flux or qwen or zimage):
            node.update(class_type="SuiteTestProvided", inputs={"key": base_key})
        elif ct == "ModelPatchLoader":  # ComfyUI's own DiffSynth class at the tiny width (see test_qwen_patch.py)
            node.update(class_type="SuiteTestProvidedPatch", inputs={"key": "workflow-patch"})
        elif ct == "ControlNetSuiteLoader" and "sd3.5" in inp["control_net_name"]:  # Stability's release layout, canny type
            inp["control_net_name"] = tiny_sd35_controlnet(host.dirs["controlnet"] / "sd35_canny_tiny.safetensors", 1, seed=25).name
        elif ct == "ControlNetSuiteLoader":
            inp["control_net_name"] = tiny_cns[k % 2]
            k += 1
        elif ct == "CLIPTextEncode":
            node["class_type"] = "SuiteTestConditioning"
            node["inputs"] = {"seed": sum(map(ord, inp["text"])) % 1000, "width": 768}
            if sd3:
                node["inputs"].update(width=SD3_TINY["context"], pooled=SD3_TINY["pooled"])
            elif flux:
                node["inputs"].update(width=FLUX_CONTEXT, pooled=FLUX_POOLED)
            elif qwen:
                node["inputs"].update(width=QWEN_CONTEXT)
            elif zimage:
                node["inputs"].update(width=ZIMAGE_CONTEXT)
        elif ct in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inp.update(width=64, height=64)
        elif ct in ("SolidMask", "MaskComposite"):
            for key in ("width", "height", "x", "y"):
                if key in inp:
                    inp[key] = max(inp[key] // 8, 0 if key in ("x", "y") else 1)
        elif ct == "KSampler":
            inp["steps"] = 2
    return prompt


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.compat) if p.stem == "canny" else p for p in WORKFLOWS],
                         ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_through_the_host(host, path):
    wf = json.loads(path.read_text())
    for n in wf["nodes"]:
        if n["type"] == "LoadImage":  # a real PNG file in ComfyUI's input folder, of another size than the latent
            rng = np.random.default_rng(len(n["widgets_values"][0]))
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(host.dirs["input"] / n["widgets_values"][0])
    prompt = substitute(ui_to_api(wf, host.nodes.NODE_CLASS_MAPPINGS), host)
    before = set(host.dirs["output"].iterdir())
    with fp32_text_encoder():
        host.run(prompt)
    new = [p for p in set(host.dirs["output"].iterdir()) - before if p.suffix == ".png"]
    assert len(new) == 1, new
    assert np.asarray(Image.open(new[0])).shape == (64, 64, 3)
