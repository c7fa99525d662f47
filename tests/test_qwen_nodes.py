"""Qwen-Image ControlNets (InstantX layout, plain and inpainting) through the suite's loader and apply nodes in the
real host, against ComfyUI's own Qwen-Image ControlNet objects on the same weights, on a tiny Qwen-Image base built
in-process (see comfy_qwen.py): final latents, token masks, modes, strength 0, wrong families."""
import pytest
import torch
from comfy_qwen import CONTEXT, host_control, instantx_file, tiny_qwen
from host import Graph, PromptFailed, finish
from test_nodes import image, spy_calls

from controlnet_core import load_control
from controlnet_core.modes import SOFT_SPAN

FILES = {"plain": "qwen_instantx_tiny.safetensors", "inpaint": "qwen_inpaint_tiny.safetensors"}
SIZE = 64


@pytest.fixture(scope="module")
def qwen(host):
    nodes = host.test_nodes
    parts = tiny_qwen()
    nodes.PROVIDED["qwen"] = (parts["model"], None, parts["vae"])
    folder = host.dirs["controlnet"]
    paths = {"plain": instantx_file(folder / FILES["plain"]), "inpaint": instantx_file(folder / FILES["inpaint"], inpaint=True, seed=42)}
    for name, path in paths.items():
        nodes.PROVIDED_CONTROL[f"qwen-{name}"] = host_control(path)
    return host


def graph(host, spy=None):
    g = Graph()
    base = g.add("SuiteTestProvided", key="qwen")
    model = (base, 0)
    if spy:
        model = (g.add("SuiteTestSpy", model=model, tag=spy), 0)
    pos = (g.add("SuiteTestConditioning", seed=1, width=CONTEXT), 0)
    neg = (g.add("SuiteTestConditioning", seed=2, width=CONTEXT), 0)
    latent = (g.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1), 0)
    return g, model, pos, neg, latent, (base, 2)


def control(g, kind, name):
    if kind == "ours":
        return (g.add("ControlNetSuiteLoader", control_net_name=FILES[name]), 0)
    return (g.add("SuiteTestProvidedControlNet", key=f"qwen-{name}"), 0)


def apply(kind, g, pos, neg, cn, img, vae, strength=1.0, mode="balanced", mask=None):
    if kind == "builtin":
        n = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=cn, image=img, strength=strength, start_percent=0.0,
                  end_percent=1.0, vae=vae)
    else:
        n = g.add("ControlNetSuiteApply", positive=pos, negative=neg, control_net=cn, image=img, strength=strength, start_percent=0.0,
                  end_percent=1.0, control_mode=mode, resize_mode="crop and resize", vae=vae, **({"mask": mask} if mask else {}))
    return (n, 0), (n, 1)


def run(host, build=None, spy=None):
    g, model, pos, neg, latent, vae = graph(host, spy)
    if build is not None:
        pos, neg = build(g, pos, neg, vae)
    return host.run(finish(g, model, pos, neg, latent, cfg=2.5))["out"]


def test_files_load_as_qwen_image(qwen):
    plain, inpaint = (load_control(qwen.dirs["controlnet"] / FILES[n]) for n in ("plain", "inpaint"))
    assert plain.format == inpaint.format == "qwen-instantx" and plain.kind == "qwen_controlnet" and plain.takes_latent_hint
    assert inpaint.config.extra_conditioning_channels == 1


def test_our_nodes_match_the_builtin_control_and_interoperate(qwen):
    results = {}
    for combo in ("builtin+builtin", "ours+ours", "ours+builtin", "builtin+ours"):
        load_kind, apply_kind = combo.split("+")
        results[combo] = run(qwen, lambda g, pos, neg, vae, apply_kind=apply_kind, load_kind=load_kind: apply(apply_kind, g, pos, neg, control(g, load_kind, "plain"),
                                                                   image(g, SIZE, SIZE, seed=3), vae, 0.8))
    ref = results["builtin+builtin"]
    assert (ref - run(qwen)).abs().max() > 1e-3
    for combo, out in results.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=combo)


def test_inpainting_through_comfys_inpainting_node_matches_the_builtin(qwen):
    results = {}
    for kind in ("ours", "builtin"):
        def build(g, pos, neg, vae, kind=kind):
            mask = (g.add("SolidMask", value=0.0, width=SIZE, height=SIZE), 0)
            hole = (g.add("SolidMask", value=1.0, width=SIZE // 2, height=SIZE // 2), 0)
            mask = (g.add("MaskComposite", destination=mask, source=hole, x=16, y=16, operation="add"), 0)
            n = g.add("ControlNetInpaintingAliMamaApply", positive=pos, negative=neg, control_net=control(g, kind, "inpaint"), vae=vae,
                      image=image(g, SIZE, SIZE, seed=5), mask=mask, strength=1.0, start_percent=0.0, end_percent=1.0)
            return (n, 0), (n, 1)
        results[kind] = run(qwen, build)
    torch.testing.assert_close(results["ours"], results["builtin"], rtol=1e-4, atol=1e-4)


def test_mask_modes_and_strength_zero(qwen):
    qwen.spy.clear()

    def build(mode="balanced", masked=False, strength=1.0):
        def b(g, pos, neg, vae):
            mask = None
            if masked:
                ones = (g.add("SolidMask", value=1.0, width=SIZE, height=SIZE), 0)
                zeros = (g.add("SolidMask", value=0.0, width=SIZE // 2, height=SIZE), 0)
                mask = (g.add("MaskComposite", destination=ones, source=zeros, x=0, y=0, operation="multiply"), 0)
            return apply("ours", g, pos, neg, control(g, "ours", "plain"), image(g, SIZE, SIZE, seed=3), vae, strength, mode, mask)
        return b

    run(qwen, build(), spy="bal")
    run(qwen, build(masked=True), spy="half")
    run(qwen, build(mode="prompt is more important"), spy="soft")
    bal, half, soft = (spy_calls(qwen, t)[0]["control"]["input"] for t in ("bal", "half", "soft"))
    assert len(bal) == 60  # ComfyUI's 60 slots: 2 outputs, 30 slots each
    for i, (b, h, s) in enumerate(zip(bal, half, soft)):
        b4, h4 = b.reshape(b.shape[0], 4, 4, -1), h.reshape(h.shape[0], 4, 4, -1)
        assert torch.equal(h4[:, :, :2], torch.zeros_like(h4[:, :, :2]))
        torch.testing.assert_close(h4[:, :, 2:], b4[:, :, 2:], rtol=0, atol=0)
        torch.testing.assert_close(s, b * (0.825 ** SOFT_SPAN if i < 30 else 1.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(run(qwen, build(strength=0.0)), run(qwen), rtol=0, atol=0)


def test_two_units_in_a_stack_add_up_and_start_end_hold(qwen):
    """A stack of two Qwen-Image units gives the host the sum of each unit's control, slot by slot; steps before the
    units' start get no control at all."""
    qwen.spy.clear()

    def stacked(seeds, start=0.0, end=1.0):
        def b(g, pos, neg, vae):
            stack = None
            for s in seeds:
                kw = dict(control_net=control(g, "ours", "plain"), image=image(g, SIZE, SIZE, seed=s), strength=0.7, start_percent=start,
                          end_percent=end, control_mode="balanced", resize_mode="crop and resize")
                stack = (g.add("ControlNetSuiteStack", **kw, **({"stack": stack} if stack else {})), 0)
            n = g.add("ControlNetSuiteApplyStack", positive=pos, negative=neg, stack=stack, vae=vae)
            return (n, 0), (n, 1)
        return b

    for tag, seeds in (("a", [3]), ("b", [4]), ("ab", [3, 4])):
        run(qwen, stacked(seeds), spy=tag)
    a, b, ab = (spy_calls(qwen, t)[0]["control"]["input"] for t in ("a", "b", "ab"))
    assert len(ab) == len(a) == 60
    for x, y, s in zip(a, b, ab):
        torch.testing.assert_close(s, x + y, rtol=1e-6, atol=1e-6)
    run(qwen, stacked([3, 4], start=0.5, end=1.0), spy="late")
    calls = spy_calls(qwen, "late")
    assert calls[0]["control"] is None and calls[-1]["control"] is not None, [c["control"] is None for c in calls]


def test_a_flux_controlnet_on_qwen_image_stops_before_sampling(qwen):
    from comfy_flux import instantx_file as flux_file

    flux_file(qwen.dirs["controlnet"] / "flux_on_qwen_tiny.safetensors")
    qwen.spy.clear()
    g, model, pos, neg, latent, vae = graph(qwen, spy="wrong")
    pos, neg = apply("ours", g, pos, neg, (g.add("ControlNetSuiteLoader", control_net_name="flux_on_qwen_tiny.safetensors"), 0),
                     image(g, SIZE, SIZE), vae)
    with pytest.raises(PromptFailed) as e:
        qwen.run(finish(g, model, pos, neg, latent, cfg=2.5))
    assert "is a Flux ControlNet" in str(e.value) and "Qwen-Image transformer" in str(e.value)
    assert spy_calls(qwen, "wrong") == []
