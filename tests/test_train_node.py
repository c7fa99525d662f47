"""Train ControlNet (Suite) inside the real ComfyUI host: checkpoint loader -> train -> apply -> KSampler.

The host's tiny SD1.5-shaped checkpoint has no text encoder, so the node's CLIP input comes from a second one
with a full-size random CLIP-L (clip_checkpoint.py); the dataset is a tiny fill50k-like folder written here.
"""
import json

import pytest
import torch
from clip_checkpoint import fp32_text_encoder, tiny_checkpoint_with_clip
from host import Graph, PromptFailed
from safetensors.torch import load_file

STEPS = 3  # training steps; KSampler uses 2, so their progress-bar totals differ


@pytest.fixture(scope="module", autouse=True)
def _fp32_text_encoder(host):
    with fp32_text_encoder():
        yield


@pytest.fixture(scope="module")
def clip_checkpoint(host):
    return tiny_checkpoint_with_clip(host)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from controlnet_core.train.toy import make_fill50k

    return make_fill50k(tmp_path_factory.mktemp("train_data") / "fill", n=4, size=64, seed=1)


def train_inputs(ckpt, dataset, **kw):
    inputs = dict(model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2), dataset_folder=str(dataset), steps=STEPS, learning_rate=1e-3,
                  batch_size=2, empty_prompt_rate=0.5, resolution=64, seed=3, output_name="trained_cn", resume=False,
                  gradient_checkpointing=False)
    inputs.update(kw)
    return inputs


def sampled(g, ckpt, positive, negative, key="out"):
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=(ckpt, 0), seed=7, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
               positive=positive, negative=negative, latent_image=(latent, 0), denoise=1.0)
    g.add("SuiteTestCapture", samples=(ks, 0), key=key)


def prompts(g, ckpt):
    pos = g.add("CLIPTextEncode", text="red circle with blue background", clip=(ckpt, 1))
    neg = g.add("CLIPTextEncode", text="", clip=(ckpt, 1))
    return (pos, 0), (neg, 0)


def hint(g):
    return (g.add("SuiteTestImage", width=64, height=64, channels=3, batch=1, seed=4), 0)


def trained_and_plain(g, model, train, pos, neg):
    """Sample once through our Apply node with the trained ControlNet ("trained") and once without it ("plain")."""
    app = g.add("ControlNetSuiteApply", positive=pos, negative=neg, control_net=(train, 0), image=hint(g), strength=1.0,
                start_percent=0.0, end_percent=1.0, control_mode="balanced", resize_mode="crop and resize")
    sampled(g, model, (app, 0), (app, 1), key="trained")
    sampled(g, model, pos, neg, key="plain")


@pytest.fixture
def progress_hook():
    """Records ComfyUI progress-bar updates (the hook a real server installs); `interrupt_at` presses Cancel."""
    import comfy.model_management
    import comfy.utils

    calls, state = [], {"interrupt_at": None}

    def hook(value, total, preview=None, node_id=None):
        calls.append((value, total))
        if total == state.get("total") and value == state["interrupt_at"]:
            comfy.model_management.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    yield calls, state
    comfy.utils.set_progress_bar_global_hook(previous)
    comfy.model_management.interrupt_current_processing(False)


def test_train_apply_sample_and_the_file_loads_in_comfys_own_loader(host, clip_checkpoint, dataset, progress_hook):
    calls, _ = progress_hook
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=clip_checkpoint)
    train = g.add("ControlNetSuiteTrain", **train_inputs(ckpt, dataset))
    pos, neg = prompts(g, ckpt)
    trained_and_plain(g, ckpt, train, pos, neg)
    out = host.run(g.prompt)
    assert torch.isfinite(out["trained"]).all() and not torch.allclose(out["trained"], out["plain"], atol=1e-4)
    assert [v for v, t in calls if t == STEPS][-STEPS:] == [1, 2, 3]  # ComfyUI's progress bar saw every step

    path = host.dirs["controlnet"] / "trained_cn.safetensors"
    sd = load_file(path)
    assert "control_model.zero_convs.0.0.weight" in sd and "control_model.input_hint_block.0.weight" in sd  # v1.1 layout
    zero = [k for k in sd if k.startswith(("control_model.zero_convs.", "control_model.middle_block_out."))]
    assert zero and all(sd[k].abs().max() > 0 for k in zero if k.endswith("weight"))  # created at 0, moved by training
    run = host.dirs["output"] / "controlnet_training" / "trained_cn"
    assert (run / "loss.png").is_file() and (run / "checkpoint.pt").is_file()
    assert sorted(map(int, json.loads((run / "losses.json").read_text()))) == [1, 2, 3]
    assert any((run / "cache" / "latents").rglob("*.safetensors")) and any((run / "cache" / "text").rglob("*.safetensors"))

    # the same file through ComfyUI's built-in ControlNetLoader and Apply ControlNet gives the same sample
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=clip_checkpoint)
    pos, neg = prompts(g, ckpt)
    cn = g.add("ControlNetLoader", control_net_name="trained_cn.safetensors")
    app = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=(cn, 0), image=hint(g), strength=1.0,
                start_percent=0.0, end_percent=1.0)
    sampled(g, ckpt, (app, 0), (app, 1), key="builtin")
    builtin = host.run(g.prompt)["builtin"]
    torch.testing.assert_close(builtin, out["trained"], rtol=1e-4, atol=1e-4)


# -- SDXL: ComfyUI's own SDXL model, CLIP and VAE objects (tiny; see comfy_sdxl.py), handed in by SuiteTestProvided --


@pytest.fixture(scope="module")
def sdxl(host, tmp_path_factory):
    from comfy_sdxl import tiny_sdxl

    parts = tiny_sdxl(tmp_path_factory.mktemp("sdxl"))
    host.test_nodes.PROVIDED["xl"] = (parts["model"], parts["clip"], parts["vae"])
    yield parts
    host.test_nodes.PROVIDED.pop("xl", None)


def node_module(host):
    import sys

    return sys.modules[host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteTrain"].__module__]


def test_sdxl_y_is_the_vector_comfys_sdxl_model_builds_for_the_training_size(host, sdxl):
    """The node's text encoder gives CLIPTextEncode's context and, as y, ComfyUI's own `SDXL.encode_adm` of
    CLIPTextEncode's pooled output for a resolution x resolution image: the numbers the model sees when sampling."""
    model, clip = sdxl["model"], sdxl["clip"]
    adm = node_module(host).label_channels(model)
    assert adm == 64 + 6 * 256 == model.model.diffusion_model.label_emb[0][0].in_features
    encode = node_module(host).text_encoder(clip, torch.device("cpu"), size=128, label=adm)
    prompts = ["red circle with blue background", "", "a much longer prompt about a green circle on a grey background"]
    context, y = encode(prompts)
    assert context.shape == (3, 77, 128) and y.shape == (3, adm)
    for i, p in enumerate(prompts):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)  # what CLIPTextEncode does
        theirs = model.model.encode_adm(pooled_output=pooled, width=128, height=128, crop_w=0, crop_h=0, target_width=128, target_height=128)
        assert torch.equal(y[i : i + 1], theirs.float()), p
        assert torch.equal(y[i : i + 1], model.model.encode_adm(pooled_output=pooled, width=128, height=128).float())  # ComfyUI's defaults
        assert torch.equal(context[i], cond[0].float()), p
    other = node_module(host).text_encoder(clip, torch.device("cpu"), size=64, label=adm)
    assert other.cache_identity != encode.cache_identity  # a cached y of one resolution is not read back for another
    assert not torch.equal(other(prompts[:1])[1], y[:1])


def test_sdxl_trains_applies_samples_and_the_file_loads_in_comfys_own_loader(host, sdxl, dataset, progress_hook):
    import comfy.controlnet

    from controlnet_core import create_from_unet, load_control

    calls, _ = progress_hook
    g = Graph()
    base = g.add("SuiteTestProvided", key="xl")
    clip = (base, 1)
    train = g.add("ControlNetSuiteTrain", **train_inputs(base, dataset, output_name="trained_xl"))
    pos = (g.add("CLIPTextEncode", text="red circle with blue background", clip=clip), 0)
    neg = (g.add("CLIPTextEncode", text="", clip=clip), 0)
    trained_and_plain(g, base, train, pos, neg)
    out = host.run(g.prompt)
    assert torch.isfinite(out["trained"]).all() and not torch.allclose(out["trained"], out["plain"], atol=1e-4)
    assert [v for v, t in calls if t == STEPS][-STEPS:] == [1, 2, 3]

    path = host.dirs["controlnet"] / "trained_xl.safetensors"
    sd = load_file(path)
    assert "control_model.label_emb.0.0.weight" in sd and "control_model.zero_convs.0.0.weight" in sd  # SDXL's, v1.1 layout
    zero = [k for k in sd if k.startswith(("control_model.zero_convs.", "control_model.middle_block_out."))]
    assert zero and all(sd[k].abs().max() > 0 for k in zero if k.endswith("weight"))  # created at 0, moved by training
    assert comfy.controlnet.load_controlnet(str(path)) is not None
    assert load_control(path).model.config.adm_in_channels == 64 + 6 * 256
    entries = list((host.dirs["output"] / "controlnet_training" / "trained_xl" / "cache" / "text").rglob("*.safetensors"))
    assert entries and all(set(load_file(e)) == {"value", "y"} for e in entries)  # the text cache holds (context, y)

    # the same file through ComfyUI's built-in ControlNetLoader and Apply ControlNet gives the same sample
    g = Graph()
    base = g.add("SuiteTestProvided", key="xl")
    pos = (g.add("CLIPTextEncode", text="red circle with blue background", clip=(base, 1)), 0)
    neg = (g.add("CLIPTextEncode", text="", clip=(base, 1)), 0)
    cn = g.add("ControlNetLoader", control_net_name="trained_xl.safetensors")
    app = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=(cn, 0), image=hint(g), strength=1.0,
                start_percent=0.0, end_percent=1.0)
    sampled(g, base, (app, 0), (app, 1), key="builtin")
    torch.testing.assert_close(host.run(g.prompt)["builtin"], out["trained"], rtol=1e-4, atol=1e-4)

    # one step moves only the zero convolutions (everything behind them gets no gradient while they are 0)
    g = Graph()
    base = g.add("SuiteTestProvided", key="xl")
    g.add("ControlNetSuiteTrain", **train_inputs(base, dataset, steps=1, output_name="one_step_xl"))
    host.run(g.prompt)
    unet_sd = {k: v.float() for k, v in sdxl["parts"]["unet"].state_dict().items()}
    start = create_from_unet(unet_sd, seed=3, num_heads=-1, num_head_channels=64).state_dict()
    one = {k[len("control_model."):]: v for k, v in load_file(host.dirs["controlnet"] / "one_step_xl.safetensors").items()}
    assert one.keys() == start.keys()
    moved = {k for k in one if not torch.equal(one[k], start[k])}
    assert moved and all(k.startswith(("zero_convs.", "middle_block_out.")) for k in moved), sorted(moved)[:5]


def test_sdxl_with_a_clip_of_another_family_is_refused(host, sdxl, clip_checkpoint, dataset):
    g = Graph()
    base = g.add("SuiteTestProvided", key="xl")
    sd1 = g.add("CheckpointLoaderSimple", ckpt_name=clip_checkpoint)
    g.add("ControlNetSuiteTrain", **{**train_inputs(base, dataset, output_name="mismatched_xl"), "clip": (sd1, 1)})
    with pytest.raises(PromptFailed, match=r"Train ControlNet \(Suite\): the connected CLIP gives a 768-channel pooled output, but the "
                                           r"SDXL model's label input takes a 64-channel pooled output plus 1536 size channels"):
        host.run(g.prompt)
    assert not (host.dirs["controlnet"] / "mismatched_xl.safetensors").exists()


def test_cancel_saves_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_does(host, clip_checkpoint, dataset, progress_hook):
    _, state = progress_hook

    def graph(name, steps, scope="ControlNet only"):
        g = Graph()
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=clip_checkpoint)
        g.add("ControlNetSuiteTrain", **train_inputs(ckpt, dataset, steps=steps, output_name=name, resume=True, gradient_checkpointing=True,
                                                     checkpointing_scope=scope))
        return g.prompt

    host.run(graph("straight_cn", 4))
    state.update(total=4, interrupt_at=2)
    with pytest.raises(PromptFailed):
        host.run(graph("cancelled_cn", 4, scope="ControlNet and base UNet"))
    ckpt = host.dirs["output"] / "controlnet_training" / "cancelled_cn" / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 2 and saved["config"]["gradient_checkpointing"] == "all"
    assert not (host.dirs["controlnet"] / "cancelled_cn.safetensors").exists()
    state.update(interrupt_at=None)
    host.run(graph("cancelled_cn", 4))  # resumed with the other scope: it changes memory and time, not the weights
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 4 and saved["config"]["gradient_checkpointing"] == "controlnet"
    a, b = load_file(host.dirs["controlnet"] / "straight_cn.safetensors"), load_file(host.dirs["controlnet"] / "cancelled_cn.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def refusal(host, clip_checkpoint, folder, **kw) -> str:
    """The message with which the Train node refuses these inputs."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=clip_checkpoint)
    g.add("ControlNetSuiteTrain", **train_inputs(ckpt, folder, **{"output_name": "bad_cn", **kw}))
    with pytest.raises(PromptFailed) as e:
        host.run(g.prompt)
    return str(e.value)


def test_clear_errors_for_missing_folder_empty_dataset_and_too_little_data(host, clip_checkpoint, tmp_path):
    def run(folder, **kw):
        return refusal(host, clip_checkpoint, folder, **kw)

    msg = run(tmp_path / "nope")
    assert "Train ControlNet (Suite)" in msg and "does not exist" in msg and "nope" in msg
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "prompt.json").write_text("\n")
    assert "prompt file is empty" in run(tmp_path / "empty")
    (tmp_path / "bare").mkdir()
    assert "expected prompt.json" in run(tmp_path / "bare")
    from controlnet_core.train.toy import make_fill50k

    one = make_fill50k(tmp_path / "one", n=1, size=64)
    assert "fewer than one batch of 2" in run(one)
    assert "not a plain file name" in run(one, output_name="../escape")


def test_bad_files_and_memory_beyond_the_limits_stop_the_node_before_training(host, clip_checkpoint, tmp_path):
    """Every bad file named at once; the resolution widget's maximum and a batch above the megapixel limit refused with
    the size, the limit and what to change; nothing loaded or written (the UNet is never copied, no run folder)."""
    import cv2
    import numpy as np

    from controlnet_core.train.toy import make_fill50k

    def run(folder, **kw):
        return refusal(host, clip_checkpoint, folder, output_name="limited_cn", **kw)

    bad = make_fill50k(tmp_path / "bad", n=4, size=64)
    (bad / "target" / "1.png").write_bytes(b"GIF89a, or so it says")
    cv2.imwrite(str(bad / "source" / "3.png"), np.zeros((48, 64, 3), np.uint8))
    msg = run(bad)
    assert "Train ControlNet (Suite): " in msg and "2 problems in the training data, found before training started" in msg
    assert "target/1.png: not a readable image" in msg and "source/3.png: is 64x48 but its image target/3.png is 64x64" in msg
    good = make_fill50k(tmp_path / "good", n=32, size=64)
    msg = run(good, resolution=4096)  # the widget's maximum
    assert "training at 4096x4096 (its largest bucket) is 16.78 megapixels per image, above the limit of 4.7" in msg
    assert "Lower the resolution" in msg and "CNS_MAX_TRAIN_MEGAPIXELS" in msg
    msg = run(good, resolution=1024, batch_size=32)
    assert "a batch of 32 images at 1024x1024 (its largest bucket) is 33.6 megapixels, above the limit of 19" in msg
    assert "Lower the batch size" in msg and "CNS_MAX_TRAIN_BATCH_MEGAPIXELS" in msg
    assert not (host.dirs["output"] / "controlnet_training" / "limited_cn").exists()
    assert not (host.dirs["controlnet"] / "limited_cn.safetensors").exists()


def test_derived_conditions_from_an_annotator(host, clip_checkpoint, tmp_path):
    import shutil

    from controlnet_core.train.toy import make_fill50k

    src = make_fill50k(tmp_path / "src", n=2, size=64, seed=2)
    root = tmp_path / "images_only"
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    for i, line in enumerate(src.joinpath("prompt.json").read_text().splitlines()):
        d = json.loads(line)
        shutil.copy(src / d["target"], root / "images" / f"{i}.png")
        (root / "captions" / f"{i}.txt").write_text(d["prompt"])
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=clip_checkpoint)
    g.add("ControlNetSuiteTrain", **train_inputs(ckpt, root, steps=1, output_name="canny_cn", annotator="canny"))
    host.run(g.prompt)
    assert (host.dirs["controlnet"] / "canny_cn.safetensors").is_file()


def _model_patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def test_unsupported_model_types_are_refused_with_their_name(host):
    """Real ComfyUI model objects of other families: SDXL-type with another label input and the SDXL refiner (tiny
    configs) in every host, Flux in hosts that have it (0.3.75 and later)."""
    import comfy.supported_models
    from comfy_sdxl import refiner_model
    from factories import SDXL_TINY, comfy_unet_kwargs

    node = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteTrain"]()
    args = dict(clip=None, vae=None, dataset_folder="x", steps=1, learning_rate=1e-4, batch_size=1, empty_prompt_rate=0.5,
                resolution=64, seed=0, output_name="x", resume=False)
    with torch.no_grad():  # an SDXL-class model whose label input is not pooled text + 6 x 256 size channels
        sdxl = comfy.supported_models.SDXL(comfy_unet_kwargs(SDXL_TINY)).get_model({})
    with pytest.raises(ValueError, match=r"SDXL \(SDXL\), a UNet with a 96-channel label input.*pooled-text/size vector"):
        node.train(_model_patcher(sdxl), **args)
    with pytest.raises(ValueError, match=r"SDXLRefiner \(SDXLRefiner\), a UNet with a 1344-channel label input.*refiner"):
        node.train(refiner_model(), **args)
    if not host.new:
        return  # ComfyUI a28a9dc (March 2024) predates Flux and SD3
    flux_cfg = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
                "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
                "theta": 10000, "qkv_bias": True, "guidance_embed": False}
    import dataclasses

    import comfy.ldm.flux.model

    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:  # ComfyUI 0.8 added it
        flux_cfg["txt_ids_dims"] = []
    with torch.no_grad():
        flux = comfy.supported_models.Flux(flux_cfg).get_model({})
    with pytest.raises(ValueError, match=r"the connected model is Flux \(Flux\).*SD3, Flux"):
        node.train(_model_patcher(flux), **args)


def test_node_metadata(host):
    cls = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteTrain"]
    assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS["ControlNetSuiteTrain"] == "Train ControlNet (Suite)"
    assert cls.DESCRIPTION and cls.CATEGORY == "conditioning/controlnet" and cls.RETURN_TYPES == ("CONTROL_NET",)
    spec = cls.INPUT_TYPES()
    assert {"model", "clip", "vae", "dataset_folder", "steps", "learning_rate", "batch_size", "empty_prompt_rate", "seed",
            "output_name", "resume"} <= set(spec["required"]) and "annotator" in spec["optional"]
    assert "canny" in spec["optional"]["annotator"][0]
    for section in spec.values():
        for name, s in section.items():
            assert len(s) > 1 and s[1].get("tooltip"), name
