"""Flux ControlNets (InstantX latent-hint, union, inpainting; XLabs pixel-hint) through the suite's loader and apply
nodes in the real host, against ComfyUI's own Flux ControlNet objects and apply nodes on the same weights, on a tiny
Flux base (built in-process: see comfy_flux.py): final latents, token masks, modes, strength 0, wrong families."""
import pytest
import torch
from comfy_flux import CONTEXT, POOLED, host_control, instantx_file, tiny_flux, xlabs_file
from factories import save
from host import Graph, PromptFailed, finish
from safetensors.torch import load_file
from test_nodes import image, spy_calls

from controlnet_core import load_control
from controlnet_core.modes import SOFT_SPAN

FILES = {"plain": "flux_instantx_tiny.safetensors", "union": "flux_union_tiny.safetensors", "inpaint": "flux_inpaint_tiny.safetensors",
         "xlabs": "flux_xlabs_tiny.safetensors", "plain-fp8": "flux_instantx_tiny_fp8.safetensors", "xlabs-fp8": "flux_xlabs_tiny_fp8.safetensors"}
SIZE = 64


@pytest.fixture(scope="module")
def flux(host):
    nodes = host.test_nodes  # the module as the host loaded it (not the one `import comfy_test_nodes` would give)
    parts = tiny_flux()
    nodes.PROVIDED["flux"] = (parts["model"], None, parts["vae"])
    folder = host.dirs["controlnet"]
    paths = {"plain": instantx_file(folder / FILES["plain"]), "union": instantx_file(folder / FILES["union"], modes=4, seed=33),
             "inpaint": instantx_file(folder / FILES["inpaint"], inpaint=True, seed=34), "xlabs": xlabs_file(folder / FILES["xlabs"])}
    for name in ("plain", "xlabs"):  # fp8 files, as Flux ControlNets are mostly published
        paths[f"{name}-fp8"] = save(folder / FILES[f"{name}-fp8"], {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(paths[name])).items()})
    for name, path in paths.items():
        nodes.PROVIDED_CONTROL[f"flux-{name}"] = host_control(path)
    return host


def graph(host, spy=None):
    g = Graph()
    base = g.add("SuiteTestProvided", key="flux")
    model = (base, 0)
    if spy:
        model = (g.add("SuiteTestSpy", model=model, tag=spy), 0)
    pos = (g.add("SuiteTestConditioning", seed=1, width=CONTEXT, pooled=POOLED), 0)
    neg = (g.add("SuiteTestConditioning", seed=2, width=CONTEXT, pooled=POOLED), 0)
    latent = (g.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1), 0)
    return g, model, pos, neg, latent, (base, 2)


def control(g, kind, name):
    if kind == "ours":
        return (g.add("ControlNetSuiteLoader", control_net_name=FILES[name]), 0)
    return (g.add("SuiteTestProvidedControlNet", key=f"flux-{name}"), 0)


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
    return host.run(finish(g, model, pos, neg, latent, cfg=2.0))["out"]


def test_files_load_as_flux_families(flux):
    got = {name: load_control(flux.dirs["controlnet"] / f) for name, f in FILES.items()}
    assert {n: lc.format for n, lc in got.items()} == {"plain": "flux-instantx", "union": "flux-instantx", "inpaint": "flux-instantx",
                                                      "xlabs": "flux-xlabs", "plain-fp8": "flux-instantx", "xlabs-fp8": "flux-xlabs"}
    assert got["plain"].takes_latent_hint and not got["xlabs"].takes_latent_hint
    assert got["union"].config.num_modes == 4 and got["inpaint"].config.extra_conditioning_channels == 1


@pytest.mark.parametrize("name", ["plain", "xlabs"])
def test_our_nodes_match_the_builtin_control_and_interoperate(flux, name):
    results = {}
    for combo in ("builtin+builtin", "ours+ours", "ours+builtin", "builtin+ours"):
        load_kind, apply_kind = combo.split("+")
        results[combo] = run(flux, lambda g, pos, neg, vae, apply_kind=apply_kind, load_kind=load_kind: apply(apply_kind, g, pos, neg, control(g, load_kind, name),
                                                                   image(g, SIZE, SIZE, seed=3), vae, 0.8))
    ref = results["builtin+builtin"]
    assert ref.shape == (1, 16, 8, 8) and (ref - run(flux)).abs().max() > 1e-3
    for combo, out in results.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=combo)


@pytest.mark.parametrize("name", ["plain-fp8", "xlabs-fp8"])
def test_fp8_files_stay_fp8_in_memory_and_match_the_builtins_fp8_path(flux, name):
    """Our loader holds an fp8 file as ComfyUI's does (fp8 weights, each cast to the host's compute dtype where it is
    used: float32 on this CPU), and gives the built-in's final latent, which runs the same file through its
    manual-cast operations."""
    (loaded,) = flux.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteLoader"]().load(FILES[name])
    model = loaded.backend.model
    stored = {p.dtype for n, p in model.named_parameters() if n.endswith("qkv.weight") or n.endswith("to_q.weight")}
    assert stored == {torch.float8_e4m3fn} and model.compute_dtype == torch.float32
    fp8_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fp8_bytes < 0.4 * sum(p.numel() * 4 for p in model.parameters())  # an upcast model would hold 4 bytes per weight
    results = {}
    for combo in ("builtin+builtin", "ours+ours", "ours+builtin"):
        load_kind, apply_kind = combo.split("+")
        results[combo] = run(flux, lambda g, pos, neg, vae, apply_kind=apply_kind, load_kind=load_kind: apply(apply_kind, g, pos, neg, control(g, load_kind, name),
                                                                   image(g, SIZE, SIZE, seed=3), vae, 0.8))
    ref = results["builtin+builtin"]
    assert (ref - run(flux)).abs().max() > 1e-3
    for combo, out in results.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=combo)


def test_union_type_from_comfys_node_matches_the_builtin(flux):
    results = {}
    for kind in ("ours", "builtin"):
        def build(g, pos, neg, vae, kind=kind):
            cn = (g.add("SetUnionControlNetType", control_net=control(g, kind, "union"), type="depth"), 0)
            return apply(kind, g, pos, neg, cn, image(g, SIZE, SIZE, seed=3), vae)
        results[kind] = run(flux, build)
    untyped = run(flux, lambda g, pos, neg, vae: apply("ours", g, pos, neg, control(g, "ours", "union"), image(g, SIZE, SIZE, seed=3), vae))
    torch.testing.assert_close(results["ours"], results["builtin"], rtol=1e-4, atol=1e-4)
    assert (results["ours"] - untyped).abs().max() > 1e-4  # the type token reached the model


def test_inpainting_through_comfys_inpainting_node_matches_the_builtin(flux):
    results = {}
    for kind in ("ours", "builtin"):
        def build(g, pos, neg, vae, kind=kind):
            mask = (g.add("SolidMask", value=0.0, width=SIZE, height=SIZE), 0)
            hole = (g.add("SolidMask", value=1.0, width=SIZE // 2, height=SIZE // 2), 0)
            mask = (g.add("MaskComposite", destination=mask, source=hole, x=16, y=16, operation="add"), 0)
            n = g.add("ControlNetInpaintingAliMamaApply", positive=pos, negative=neg, control_net=control(g, kind, "inpaint"), vae=vae,
                      image=image(g, SIZE, SIZE, seed=5), mask=mask, strength=1.0, start_percent=0.0, end_percent=1.0)
            return (n, 0), (n, 1)
        results[kind] = run(flux, build)
    torch.testing.assert_close(results["ours"], results["builtin"], rtol=1e-4, atol=1e-4)


def first_control(host, tag):
    return spy_calls(host, tag)[0]["control"]


def test_mask_zeroes_the_masked_tokens_of_double_and_single_outputs(flux):
    flux.spy.clear()

    def build(masked):
        def b(g, pos, neg, vae):
            mask = None
            if masked:
                ones = (g.add("SolidMask", value=1.0, width=SIZE, height=SIZE), 0)
                zeros = (g.add("SolidMask", value=0.0, width=SIZE // 2, height=SIZE), 0)
                mask = (g.add("MaskComposite", destination=ones, source=zeros, x=0, y=0, operation="multiply"), 0)
            return apply("ours", g, pos, neg, control(g, "ours", "plain"), image(g, SIZE, SIZE, seed=3), vae, mask=mask)
        return b

    run(flux, build(False), spy="full")
    run(flux, build(True), spy="half")
    full, half = first_control(flux, "full"), first_control(flux, "half")
    for key in ("input", "output"):
        assert len(full[key]) == len(half[key]) == (19 if key == "input" else 38)
        for f, h in zip(full[key], half[key]):
            f, h = f.reshape(f.shape[0], 4, 4, -1), h.reshape(h.shape[0], 4, 4, -1)
            assert torch.equal(h[:, :, :2], torch.zeros_like(h[:, :, :2]))
            torch.testing.assert_close(h[:, :, 2:], f[:, :, 2:], rtol=0, atol=0)


def test_prompt_mode_weights_double_then_single_outputs(flux):
    flux.spy.clear()
    for tag, mode in (("bal", "balanced"), ("soft", "prompt is more important")):
        run(flux, lambda g, pos, neg, vae, mode=mode: apply("ours", g, pos, neg, control(g, "ours", "plain"), image(g, SIZE, SIZE, seed=3),
                                                            vae, mode=mode), spy=tag)
    bal, soft = first_control(flux, "bal"), first_control(flux, "soft")
    # 2 double outputs (each over 10 / 9 slots) then 1 single output: three distinct outputs
    w = [0.825 ** SOFT_SPAN, 0.825 ** (SOFT_SPAN / 2), 1.0]
    for i, (b, s) in enumerate(zip(bal["input"], soft["input"])):
        torch.testing.assert_close(s, b * w[0 if i < 10 else 1], rtol=1e-6, atol=0)
    for b, s in zip(bal["output"], soft["output"]):
        torch.testing.assert_close(s, b * w[2], rtol=1e-6, atol=0)


def test_strength_zero_is_bit_identical_to_no_control(flux):
    zero = run(flux, lambda g, pos, neg, vae: apply("ours", g, pos, neg, control(g, "ours", "plain"), image(g, SIZE, SIZE), vae, 0.0))
    torch.testing.assert_close(zero, run(flux), rtol=0, atol=0)


def test_a_unet_controlnet_on_flux_stops_before_sampling(flux):
    flux.spy.clear()
    g, model, pos, neg, latent, vae = graph(flux, spy="wrong")
    pos, neg = apply("ours", g, pos, neg, (g.add("ControlNetSuiteLoader", control_net_name="cn_a.safetensors"), 0), image(g, SIZE, SIZE), vae)
    with pytest.raises(PromptFailed) as e:
        flux.run(finish(g, model, pos, neg, latent, cfg=2.0))
    assert "for UNet models" in str(e.value) and "Flux.1 transformer" in str(e.value)
    assert spy_calls(flux, "wrong") == []


def test_our_union_node_gives_a_flux_union_its_own_mode_number(flux):
    """'depth' is mode 2 of InstantX's Flux union; ComfyUI's SetUnionControlNetType sends that number for its
    'hed/pidi/scribble/ted' entry (it numbers types in the SDXL order), so the two runs must agree."""
    ours = run(flux, lambda g, pos, neg, vae: apply("ours", g, pos, neg, (g.add("ControlNetSuiteUnion", control_net=control(g, "ours", "union"),
                                                                                 type="depth", weight=1.0), 0), image(g, SIZE, SIZE, seed=3), vae))
    theirs = run(flux, lambda g, pos, neg, vae: apply("builtin", g, pos, neg, (g.add("SetUnionControlNetType", control_net=control(g, "builtin", "union"),
                                                                                     type="hed/pidi/scribble/ted"), 0), image(g, SIZE, SIZE, seed=3), vae))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(PromptFailed, match="not a mode of"):
        run(flux, lambda g, pos, neg, vae: apply("ours", g, pos, neg, (g.add("ControlNetSuiteUnion", control_net=control(g, "ours", "union"),
                                                                             type="segment", weight=1.0), 0), image(g, SIZE, SIZE), vae))
