"""SD3 / SD3.5 ControlNets (diffusers layout) through the suite's loader and apply nodes in the real host, against
ComfyUI's own loader and apply nodes on the same random weights: final latents, strength, token-grid masks, the modes,
stacks, the inpainting variant, and the errors that must come before sampling."""
import pytest
import torch
from host import SD3_TINY, TINY_SD3_CHECKPOINT, Graph, PromptFailed, finish, make_tiny_sd3_checkpoint, tiny_sd3_controlnet, tiny_sd35_controlnet
from test_nodes import image, spy_calls

from controlnet_core import load_control
from controlnet_core.modes import SOFT_SPAN

PLAIN, INPAINT, NARROW = "sd3_tiny.safetensors", "sd3_inpaint_tiny.safetensors", "sd3_narrow_tiny.safetensors"
FLUX = "flux_on_sd3_tiny.safetensors"
STABILITY = {0: "sd35_blur_tiny.safetensors", 1: "sd35_canny_tiny.safetensors", 2: "sd35_depth_tiny.safetensors"}
SIZE = 64  # pixels: a 8 x 8 latent, 4 x 4 tokens


@pytest.fixture(scope="module")
def sd3(host):
    make_tiny_sd3_checkpoint(host.dirs["checkpoints"] / TINY_SD3_CHECKPOINT)
    cn = host.dirs["controlnet"]
    tiny_sd3_controlnet(cn / PLAIN)
    tiny_sd3_controlnet(cn / INPAINT, inpaint=True, seed=22)
    tiny_sd3_controlnet(cn / NARROW, width=128, seed=23)  # an SD3 ControlNet for another width
    for control_type, name in STABILITY.items():
        tiny_sd35_controlnet(cn / name, control_type, seed=24 + control_type)
    return host


def sd3_graph(host, *, spy=None, batch=1):
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=TINY_SD3_CHECKPOINT)
    model = (ckpt, 0)
    if spy:
        model = (g.add("SuiteTestSpy", model=model, tag=spy), 0)
    pos = (g.add("SuiteTestConditioning", seed=1, width=SD3_TINY["context"], pooled=SD3_TINY["pooled"]), 0)
    neg = (g.add("SuiteTestConditioning", seed=2, width=SD3_TINY["context"], pooled=SD3_TINY["pooled"]), 0)
    latent = (g.add("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=batch), 0)
    return g, model, pos, neg, latent, (ckpt, 2)


def ours(g, pos, neg, name, img, vae, *, strength=1.0, mode="balanced", mask=None, start=0.0, end=1.0):
    kw = dict(positive=pos, negative=neg, control_net=(g.add("ControlNetSuiteLoader", control_net_name=name), 0), image=img,
              strength=strength, start_percent=start, end_percent=end, control_mode=mode, resize_mode="crop and resize")
    if vae is not None:
        kw["vae"] = vae
    if mask is not None:
        kw["mask"] = mask
    n = g.add("ControlNetSuiteApply", **kw)
    return (n, 0), (n, 1)


def run(host, build, *, spy=None, batch=1):
    g, model, pos, neg, latent, vae = sd3_graph(host, spy=spy, batch=batch)
    if build is not None:
        pos, neg = build(g, pos, neg, vae)
    return host.run(finish(g, model, pos, neg, latent))["out"]


def loaders(kind, name):
    node = "ControlNetSuiteLoader" if kind == "ours" else "ControlNetLoader"
    return lambda g: (g.add(node, control_net_name=name), 0)


def applies(kind, g, pos, neg, cn, img, vae, strength=1.0, mask=None):
    if kind == "builtin":
        n = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=cn, image=img, strength=strength,
                  start_percent=0.0, end_percent=1.0, vae=vae)
    else:
        kw = dict(mask=mask) if mask is not None else {}
        n = g.add("ControlNetSuiteApply", positive=pos, negative=neg, control_net=cn, image=img, strength=strength, start_percent=0.0,
                  end_percent=1.0, control_mode="balanced", resize_mode="crop and resize", vae=vae, **kw)
    return (n, 0), (n, 1)


def half_mask(g):
    """Left half 0, right half 1: whole tokens of the 4 x 4 grid on either side."""
    return (g.add("SolidMask", value=1.0, width=SIZE, height=SIZE), 0), (g.add("SolidMask", value=0.0, width=SIZE // 2, height=SIZE), 0)


def test_loaded_as_sd3_with_its_shapes(sd3):
    lc = load_control(sd3.dirs["controlnet"] / PLAIN)
    assert lc.format == "sd3-diffusers" and lc.kind == "sd3_controlnet" and lc.takes_latent_hint
    assert (lc.config.hidden_size, lc.config.num_layers, lc.config.base_depth) == (256, 2, 4)
    assert load_control(sd3.dirs["controlnet"] / INPAINT).config.control_channels == 17


@pytest.mark.parametrize("strength", [1.0, 0.45])
def test_our_loader_and_apply_match_the_builtin_pair_and_interoperate(sd3, strength):
    results = {}
    for combo in ("builtin+builtin", "ours+ours", "ours+builtin", "builtin+ours"):
        load_kind, apply_kind = combo.split("+")
        results[combo] = run(sd3, lambda g, pos, neg, vae, apply_kind=apply_kind, load_kind=load_kind: applies(apply_kind, g, pos, neg, loaders(load_kind, PLAIN)(g),
                                                                     image(g, SIZE, SIZE, seed=3), vae, strength))
    ref = results["builtin+builtin"]
    assert ref.shape == (1, 16, 8, 8) and torch.isfinite(ref).all()
    assert (ref - run(sd3, None)).abs().max() > 1e-3  # the control changes the result
    for combo, out in results.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=combo)


@pytest.mark.parametrize("control_type", list(STABILITY), ids=["blur", "canny", "depth"])
def test_stability_sd35_controlnets_match_the_builtin_pair(sd3, control_type):
    """Stability's release layout: the base's patch embedding adopted, the type's image preparation, the VAE shift kept."""
    name = STABILITY[control_type]
    combos = ("builtin+builtin", "ours+ours") + (("ours+builtin", "builtin+ours") if control_type == 1 else ())
    results = {}
    for combo in combos:
        load_kind, apply_kind = combo.split("+")
        results[combo] = run(sd3, lambda g, pos, neg, vae, apply_kind=apply_kind, load_kind=load_kind: applies(apply_kind, g, pos, neg, loaders(load_kind, name)(g),
                                                                     image(g, SIZE, SIZE, seed=6), vae, 0.8))
    ref = results["builtin+builtin"]
    assert (ref - run(sd3, None)).abs().max() > 1e-3
    for combo, out in results.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=combo)


def first_control(host, tag, row=None):
    call = spy_calls(host, tag)[0]
    out = call["control"]["output"]
    return out, call["cond_or_uncond"]


@pytest.mark.parametrize("loader_kind", ["ours", "builtin"])
def test_mask_acts_on_the_token_grid(sd3, loader_kind):
    """Zero on the left half: those tokens get no control, the others exactly the unmasked control; a mask of ones is
    no mask, a mask of zeros no control."""
    sd3.spy.clear()

    def build(tag_mask):
        def b(g, pos, neg, vae):
            mask = None
            if tag_mask == "half":
                ones, zeros = half_mask(g)
                mask = (g.add("MaskComposite", destination=ones, source=zeros, x=0, y=0, operation="multiply"), 0)
            elif tag_mask in ("ones", "zeros"):
                mask = (g.add("SolidMask", value=1.0 if tag_mask == "ones" else 0.0, width=SIZE, height=SIZE), 0)
            return applies("ours", g, pos, neg, loaders(loader_kind, PLAIN)(g), image(g, SIZE, SIZE, seed=3), vae, mask=mask)
        return b

    out = {m: run(sd3, build(m), spy=m) for m in ("none", "half", "ones", "zeros")}
    torch.testing.assert_close(out["ones"], out["none"], rtol=0, atol=0)
    torch.testing.assert_close(out["zeros"], run(sd3, None), rtol=0, atol=0)
    full, _ = first_control(sd3, "none")
    half, _ = first_control(sd3, "half")
    assert len(full) == len(half) == 3  # 2 control blocks over 4 base blocks: outputs 0, 0, 1
    for f, h in zip(full, half):
        f, h = f.reshape(f.shape[0], 4, 4, -1), h.reshape(h.shape[0], 4, 4, -1)
        assert torch.equal(h[:, :, :2], torch.zeros_like(h[:, :, :2]))
        torch.testing.assert_close(h[:, :, 2:], f[:, :, 2:], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["prompt is more important", "CFG resolution weighting"])
def test_modes_weight_each_distinct_control_output(sd3, mode):
    sd3.spy.clear()
    img = lambda g: image(g, SIZE, SIZE, seed=3)
    run(sd3, lambda g, pos, neg, vae: ours(g, pos, neg, PLAIN, img(g), vae), spy="bal")
    run(sd3, lambda g, pos, neg, vae: ours(g, pos, neg, PLAIN, img(g), vae, mode=mode), spy="mode")
    bal, _ = first_control(sd3, "bal")
    other, _ = first_control(sd3, "mode")
    weights = [0.825 ** SOFT_SPAN, 0.825 ** SOFT_SPAN, 1.0] if mode == "prompt is more important" else [1.0] * 3
    for b, o, w in zip(bal, other, weights):
        torch.testing.assert_close(o, b * w, rtol=1e-6, atol=0)


def test_controlnet_is_more_important_steers_the_conditional_branch_only(sd3):
    sd3.spy.clear()
    run(sd3, lambda g, pos, neg, vae: ours(g, pos, neg, PLAIN, image(g, SIZE, SIZE, seed=3), vae, mode="ControlNet is more important"), spy="cn")
    calls = spy_calls(sd3, "cn")
    assert any(c["cond_or_uncond"] == [1] and c["control"] is None for c in calls)
    assert all(c["control"] is not None for c in calls if c["cond_or_uncond"] == [0])


def test_two_sd3_units_in_a_stack_add_up(sd3):
    sd3.spy.clear()
    for tag, seeds in (("a", [3]), ("b", [4]), ("ab", [3, 4])):
        def build(g, pos, neg, vae, seeds=seeds):
            stack = None
            for s in seeds:
                kw = dict(control_net=loaders("ours", PLAIN)(g), image=image(g, SIZE, SIZE, seed=s), strength=0.7, start_percent=0.0,
                          end_percent=1.0, control_mode="balanced", resize_mode="crop and resize")
                stack = (g.add("ControlNetSuiteStack", **kw, **({"stack": stack} if stack else {})), 0)
            n = g.add("ControlNetSuiteApplyStack", positive=pos, negative=neg, stack=stack, vae=vae)
            return (n, 0), (n, 1)
        run(sd3, build, spy=tag)
    a, b, ab = (first_control(sd3, t)[0] for t in ("a", "b", "ab"))
    for x, y, s in zip(a, b, ab):
        torch.testing.assert_close(s, x + y, rtol=1e-6, atol=1e-6)


def test_inpainting_variant_matches_the_builtin_inpainting_node(sd3):
    """ComfyUI's ControlNetInpaintingAliMamaApply reads `concat_mask` and passes the keep mask; with our loader's object
    it gives what it gives with the host's own. Our apply node, with no inpainting mask, keeps everything, like the host's."""
    results = {}
    for kind in ("ours", "builtin"):
        def build(g, pos, neg, vae, kind=kind):
            mask = (g.add("SolidMask", value=0.0, width=SIZE, height=SIZE), 0)
            hole = (g.add("SolidMask", value=1.0, width=SIZE // 2, height=SIZE // 2), 0)
            mask = (g.add("MaskComposite", destination=mask, source=hole, x=16, y=16, operation="add"), 0)
            n = g.add("ControlNetInpaintingAliMamaApply", positive=pos, negative=neg, control_net=loaders(kind, INPAINT)(g), vae=vae,
                      image=image(g, SIZE, SIZE, seed=5), mask=mask, strength=1.0, start_percent=0.0, end_percent=1.0)
            return (n, 0), (n, 1)
        results[kind] = run(sd3, build)
        results[kind + " plain apply"] = run(sd3, lambda g, pos, neg, vae, kind=kind: applies(
            kind, g, pos, neg, loaders(kind, INPAINT)(g), image(g, SIZE, SIZE, seed=5), vae))
    torch.testing.assert_close(results["ours"], results["builtin"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["ours plain apply"], results["builtin plain apply"], rtol=1e-4, atol=1e-4)
    assert (results["ours"] - results["ours plain apply"]).abs().max() > 1e-4  # the mask reached the model


def test_no_vae_is_refused_at_the_apply_node(sd3):
    sd3.spy.clear()
    with pytest.raises(PromptFailed) as e:
        run(sd3, lambda g, pos, neg, vae: ours(g, pos, neg, PLAIN, image(g, SIZE, SIZE), None), spy="novae")
    msg = str(e.value)
    assert "Apply ControlNet (Suite)" in msg and PLAIN in msg and "VAE" in msg and "'vae' input" in msg
    assert spy_calls(sd3, "novae") == []


@pytest.mark.parametrize("case", ["sd3 control on sd15", "sd15 control on sd3", "other width", "flux control on sd3"])
def test_wrong_family_stops_before_sampling(sd3, case):
    from host import base_graph

    sd3.spy.clear()
    if case == "sd3 control on sd15":
        g, model, pos, neg, latent = base_graph(sd3, spy_tag="wrong")
        vae = ("1", 2)  # the SD1.5 checkpoint loader's VAE
        pos, neg = ours(g, pos, neg, PLAIN, image(g), vae)
        prompt, words = finish(g, model, pos, neg, latent), ["is an SD3-family ControlNet", "steers SD3 / SD3.5 models only"]
    else:
        g, model, pos, neg, latent, vae = sd3_graph(sd3, spy="wrong")
        name = {"sd15 control on sd3": "cn_a.safetensors", "other width": NARROW, "flux control on sd3": FLUX}[case]
        if case == "flux control on sd3":
            from comfy_flux import instantx_file

            instantx_file(sd3.dirs["controlnet"] / FLUX)
        pos, neg = ours(g, pos, neg, name, image(g, SIZE, SIZE), vae)
        prompt = finish(g, model, pos, neg, latent)
        words = {"sd15 control on sd3": ["for UNet models", "SD3-family MMDiT"], "other width": ["width 128 vs 256", "does not fit"],
                 "flux control on sd3": ["is a Flux ControlNet", "steers Flux.1 models only", "SD3-family MMDiT"]}[case]
    with pytest.raises(PromptFailed) as e:
        sd3.run(prompt)
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    assert spy_calls(sd3, "wrong") == []


@pytest.mark.parametrize("name", [PLAIN, STABILITY[1]])
def test_strength_zero_and_steps_outside_the_range_are_bit_identical_to_no_control(sd3, name):
    plain = run(sd3, None)
    zero = run(sd3, lambda g, pos, neg, vae: ours(g, pos, neg, name, image(g, SIZE, SIZE), vae, strength=0.0))
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    sd3.spy.clear()
    run(sd3, lambda g, pos, neg, vae: ours(g, pos, neg, name, image(g, SIZE, SIZE), vae, start=0.5, end=1.0), spy="late")
    calls = spy_calls(sd3, "late")
    assert calls[0]["control"] is None and calls[-1]["control"] is not None  # 4 steps: the first half without control
