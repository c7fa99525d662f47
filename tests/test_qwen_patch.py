"""DiffSynth's blockwise Qwen-Image ControlNets (model patches) through Apply ControlNet Patch (Suite), against ComfyUI's
own QwenImageDiffsynthControlnet node on the same weights, on the tiny in-process Qwen-Image base (comfy_qwen.py):
final latents (host patch object and our loader's file), inpainting, strength 0, start/end, region mask, modes, errors."""
import pytest
import torch
from comfy_qwen import CONTEXT, WIDTH, tiny_qwen
from factories import randomize_, save
from host import Graph, PromptFailed, finish
from test_nodes import image

from controlnet_core import load_control

SIZE = 64
FILE = "qwen_diffsynth_tiny.safetensors"


def host_patch(inpaint: bool, seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    from comfy_extras.nodes_model_patch import QwenImageBlockWiseControlNet

    net = QwenImageBlockWiseControlNet(num_layers=2, dim=WIDTH, additional_in_dim=4 if inpaint else 0, operations=comfy.ops.disable_weight_init)
    randomize_(net, seed)
    return comfy.model_patcher.ModelPatcher(net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


@pytest.fixture(scope="module")
def qwen(host):
    nodes = host.test_nodes
    if "qwen" not in nodes.PROVIDED:
        parts = tiny_qwen()
        nodes.PROVIDED["qwen"] = (parts["model"], None, parts["vae"])
    for name, inpaint, seed in (("plain", False, 50), ("inpaint", True, 51)):
        nodes.PROVIDED_CONTROL[f"patch-{name}"] = host_patch(inpaint, seed)
    save(host.dirs["controlnet"] / FILE, nodes.PROVIDED_CONTROL["patch-plain"].model.state_dict())
    return host


def run(host, build=None):
    g = Graph()
    base = g.add("SuiteTestProvided", key="qwen")
    model, vae = (base, 0), (base, 2)
    if build is not None:
        model = build(g, model, vae)
    pos = (g.add("SuiteTestConditioning", seed=1, width=CONTEXT), 0)
    neg = (g.add("SuiteTestConditioning", seed=2, width=CONTEXT), 0)
    latent = (g.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1), 0)
    return host.run(finish(g, model, pos, neg, latent, cfg=2.5))["out"]


def theirs(name="plain", strength=1.0, mask=None):
    def b(g, model, vae):
        kw = {"mask": mask(g)} if mask else {}
        return (g.add("QwenImageDiffsynthControlnet", model=model, model_patch=(g.add("SuiteTestProvidedPatch", key=f"patch-{name}"), 0), vae=vae,
                      image=image(g, SIZE, SIZE, seed=3), strength=strength, **kw), 0)
    return b


def ours(name="plain", strength=1.0, start=0.0, end=1.0, mode="balanced", mask=None, inpaint_mask=None, from_file=False):
    def b(g, model, vae):
        source = ({"control_net": (g.add("ControlNetSuiteLoader", control_net_name=FILE), 0)} if from_file
                  else {"patch": (g.add("SuiteTestProvidedPatch", key=f"patch-{name}"), 0)})
        kw = {k: v(g) for k, v in (("mask", mask), ("inpaint_mask", inpaint_mask)) if v}
        return (g.add("ControlNetSuiteApplyPatch", model=model, vae=vae, image=image(g, SIZE, SIZE, seed=3), strength=strength,
                      start_percent=start, end_percent=end, control_mode=mode, resize_mode="crop and resize", **source, **kw), 0)
    return b


def hole(g):
    empty = (g.add("SolidMask", value=0.0, width=SIZE, height=SIZE), 0)
    square = (g.add("SolidMask", value=1.0, width=SIZE // 2, height=SIZE // 2), 0)
    return (g.add("MaskComposite", destination=empty, source=square, x=16, y=16, operation="add"), 0)


def test_the_file_loads_as_a_model_patch(qwen):
    lc = load_control(qwen.dirs["controlnet"] / FILE)
    assert lc.format == "qwen-diffsynth" and lc.kind == "qwen_patch" and lc.config.num_layers == 2


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_matches_comfys_diffsynth_node(qwen, strength):
    ref = run(qwen, theirs(strength=strength))
    assert (ref - run(qwen)).abs().max() > 1e-3
    torch.testing.assert_close(run(qwen, ours(strength=strength)), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(qwen, ours(strength=strength, from_file=True)), ref, rtol=1e-4, atol=1e-4)


def test_inpainting_patch_matches_comfys_node_with_the_same_mask(qwen):
    ref = run(qwen, theirs("inpaint", mask=hole))
    torch.testing.assert_close(run(qwen, ours("inpaint", inpaint_mask=hole)), ref, rtol=1e-4, atol=1e-4)
    assert (ref - run(qwen, theirs("inpaint"))).abs().max() > 1e-4  # the mask reached the model


def test_suite_settings(qwen):
    plain, full = run(qwen), run(qwen, ours())
    zeros = lambda g: (g.add("SolidMask", value=0.0, width=SIZE, height=SIZE), 0)  # noqa: E731
    ones = lambda g: (g.add("SolidMask", value=1.0, width=SIZE, height=SIZE), 0)  # noqa: E731
    torch.testing.assert_close(run(qwen, ours(strength=0.0)), plain, rtol=0, atol=0)
    torch.testing.assert_close(run(qwen, ours(mask=zeros)), plain, rtol=0, atol=0)
    torch.testing.assert_close(run(qwen, ours(mask=ones)), full, rtol=0, atol=0)
    late = run(qwen, ours(start=0.5))
    assert (late - full).abs().max() > 1e-5 and (late - plain).abs().max() > 1e-5
    soft = run(qwen, ours(mode="prompt is more important"))
    assert (soft - full).abs().max() > 1e-5


def test_errors_name_the_remedy(qwen):
    with pytest.raises(PromptFailed, match="Apply ControlNet Patch"):
        def b(g, model, vae):
            return model
        g = Graph()
        base = g.add("SuiteTestProvided", key="qwen")
        pos = (g.add("SuiteTestConditioning", seed=1, width=CONTEXT), 0)
        n = g.add("ControlNetSuiteApply", positive=pos, negative=pos, control_net=(g.add("ControlNetSuiteLoader", control_net_name=FILE), 0),
                  image=image(g, SIZE, SIZE), strength=1.0, start_percent=0.0, end_percent=1.0, control_mode="balanced",
                  resize_mode="crop and resize", vae=(base, 2))
        qwen.run(finish(g, (base, 0), (n, 0), (n, 1), (g.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1), 0)))
    with pytest.raises(PromptFailed, match="connect a Qwen-Image model"):
        g = Graph()
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=qwen.checkpoint)
        m = g.add("ControlNetSuiteApplyPatch", model=(ckpt, 0), vae=(ckpt, 2), image=image(g), strength=1.0, start_percent=0.0, end_percent=1.0,
                  control_mode="balanced", resize_mode="crop and resize", patch=(g.add("SuiteTestProvidedPatch", key="patch-plain"), 0))
        pos = (g.add("SuiteTestConditioning", seed=1, width=768), 0)
        qwen.run(finish(g, (m, 0), pos, pos, (g.add("EmptyLatentImage", width=64, height=64, batch_size=1), 0)))


def test_a_stack_of_two_patch_units_is_their_sum(qwen):
    """Two chained suite nodes act as one group: each unit's control from the same tokens, added together. With the
    same image and patch, strengths 0.3 + 0.4 must equal one unit at 0.7 (a chain would not: the second unit would see
    tokens the first had changed)."""
    def two(g, model, vae):
        return ours(strength=0.4)(g, ours(strength=0.3)(g, model, vae), vae)

    torch.testing.assert_close(run(qwen, two), run(qwen, ours(strength=0.7)), rtol=1e-5, atol=1e-5)


def test_a_cloned_model_shares_the_patch_network(qwen):
    import copy

    node = qwen.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteApplyPatch"]()
    model, _, vae = qwen.test_nodes.PROVIDED["qwen"]
    patched = node.apply(model, vae, 1.0, 0.0, 1.0, "balanced", "crop and resize", image=torch.rand(1, SIZE, SIZE, 3),
                         patch=qwen.test_nodes.PROVIDED_CONTROL["patch-plain"])[0]
    group = patched.model_options["transformer_options"]["patches"]["double_block"][-1]
    clone = copy.deepcopy(group)
    assert clone is not group and clone.units[0].net is group.units[0].net and clone.units[0].patcher is group.units[0].patcher
    assert patched.clone().model_options["transformer_options"]["patches"]["double_block"][-1].units[0].net is group.units[0].net
