"""The suite's nodes inside a real ComfyUI: loader, apply, stack; KSampler end to end through PromptExecutor."""
import pytest
import torch
from host import PromptFailed, PromptInvalid, base_graph, finish

MODES = ["balanced", "prompt is more important", "ControlNet is more important", "CFG resolution weighting"]


def image(g, w=64, h=64, channels=3, batch=1, seed=0):
    return (g.add("SuiteTestImage", width=w, height=h, channels=channels, batch=batch, seed=seed), 0)


def apply(g, pos, neg, cn, img, *, strength=1.0, start=0.0, end=1.0, mode="balanced", resize="crop and resize", mask=None):
    kw = dict(positive=pos, negative=neg, control_net=cn, image=img, strength=strength, start_percent=start, end_percent=end,
              control_mode=mode, resize_mode=resize)
    if mask is not None:
        kw["mask"] = mask
    n = g.add("ControlNetSuiteApply", **kw)
    return (n, 0), (n, 1)


def loader(g, name="cn_a.safetensors"):
    return (g.add("ControlNetSuiteLoader", control_net_name=name), 0)


def run_plain(host, **kw):
    g, model, pos, neg, latent = base_graph(host, **kw)
    return host.run(finish(g, model, pos, neg, latent))["out"]


def run_one(host, *, name="cn_a.safetensors", spy=None, **apply_kw):
    g, model, pos, neg, latent = base_graph(host, spy_tag=spy)
    pos, neg = apply(g, pos, neg, loader(g, name), image(g), **apply_kw)
    return host.run(finish(g, model, pos, neg, latent))["out"]


def spy_calls(host, tag):
    return [c for c in host.spy if c["tag"] == tag]


@pytest.mark.compat
def test_end_to_end_with_our_nodes_changes_the_result(host):
    plain = run_plain(host)
    out = run_one(host)
    assert torch.isfinite(out).all() and out.shape == plain.shape == (1, 4, 8, 8)
    assert not torch.equal(out, plain)


@pytest.mark.compat
def test_strength_zero_is_bit_identical_to_no_controlnet(host):
    assert torch.equal(run_one(host, strength=0.0), run_plain(host))


def test_mask_of_zeros_is_bit_identical_to_no_controlnet(host):
    g, model, pos, neg, latent = base_graph(host)
    zeros = (g.add("SolidMask", value=0.0, width=64, height=64), 0)
    pos, neg = apply(g, pos, neg, loader(g), image(g), mask=zeros)
    assert torch.equal(host.run(finish(g, model, pos, neg, latent))["out"], run_plain(host))


def test_mask_of_other_size_and_partial_mask_runs(host):
    g, model, pos, neg, latent = base_graph(host)
    half = (g.add("SolidMask", value=1.0, width=20, height=37), 0)
    pos, neg = apply(g, pos, neg, loader(g), image(g), mask=half)
    out = host.run(finish(g, model, pos, neg, latent))["out"]
    assert torch.isfinite(out).all() and not torch.equal(out, run_plain(host))


def test_outside_start_end_the_steps_are_bit_identical(host):
    host.spy.clear()
    run_plain(host, spy_tag="plain")
    g, model, pos, neg, latent = base_graph(host, spy_tag="late")
    pos, neg = apply(g, pos, neg, loader(g), image(g), start=0.5, end=1.0)
    host.run(finish(g, model, pos, neg, latent))
    plain, late = spy_calls(host, "plain"), spy_calls(host, "late")
    assert len(plain) == len(late) == 4
    assert torch.equal(plain[0]["output"], late[0]["output"]) and late[0]["control"] is None
    assert late[-1]["control"] is not None and not torch.equal(plain[-1]["output"], late[-1]["output"])


def first_control(host, tag):
    return spy_calls(host, tag)[0]["control"]


def test_two_unit_stack_equals_the_sum_of_the_residual_sets(host):
    host.spy.clear()
    for tag, names in (("a", ["cn_a.safetensors"]), ("b", ["cn_b.safetensors"]), ("ab", ["cn_a.safetensors", "cn_b.safetensors"])):
        g, model, pos, neg, latent = base_graph(host, spy_tag=tag)
        stack = None
        for i, name in enumerate(names):
            kw = dict(control_net=loader(g, name), image=image(g, seed=i if tag != "b" else 1), strength=0.8, start_percent=0.0,
                      end_percent=1.0, control_mode="balanced", resize_mode="crop and resize")
            if stack:
                kw["stack"] = stack
            stack = (g.add("ControlNetSuiteStack", **kw), 0)
        n = g.add("ControlNetSuiteApplyStack", positive=pos, negative=neg, stack=stack)
        host.run(finish(g, model, (n, 0), (n, 1), latent))
    a, b, ab = first_control(host, "a"), first_control(host, "b"), first_control(host, "ab")
    assert spy_calls(host, "ab")[0]["cond_or_uncond"] in ([0, 1], [1, 0])  # cond and uncond still batched together
    for key in ("output", "middle"):
        assert len(ab[key]) == len(a[key]) == len(b[key]) > 0
        for x, y, s in zip(a[key], b[key], ab[key]):
            torch.testing.assert_close(s, x + y, rtol=0, atol=0)


def test_controlnet_is_more_important_leaves_the_unconditional_branch_untouched(host):
    host.spy.clear()
    for tag, mode in (("bal", "balanced"), ("cn", "ControlNet is more important")):
        run_one(host, spy=tag, mode=mode)
    cn_calls = spy_calls(host, "cn")
    assert any(1 in c["cond_or_uncond"] for c in cn_calls)
    for c in cn_calls:
        if c["cond_or_uncond"] == [1]:
            assert c["control"] is None
        else:
            assert c["cond_or_uncond"] == [0] and c["control"] is not None
    # soft weights 0.825 ** (n - i) on the conditional branch, relative to balanced (first step, same input)
    bal, cn = spy_calls(host, "bal")[0], cn_calls[0] if cn_calls[0]["cond_or_uncond"] == [0] else cn_calls[1]
    rows = bal["cond_or_uncond"].index(0)
    n = len(bal["control"]["output"])
    for i, (x, y) in enumerate(zip(bal["control"]["output"], cn["control"]["output"])):
        # batch 1 vs batch 2 kernels differ in rounding only; the weights differ by >= 17% between sites
        torch.testing.assert_close(y, x[rows : rows + 1] * 0.825 ** (n - i), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["prompt is more important", "CFG resolution weighting"])
def test_soft_and_resolution_modes_weight_each_site(host, mode):
    host.spy.clear()
    run_one(host, spy="bal", mode="balanced")
    run_one(host, spy="mode", mode=mode)
    bal, other = spy_calls(host, "bal")[0]["control"], spy_calls(host, "mode")[0]["control"]
    sites = bal["output"] + bal["middle"]
    n = len(bal["output"])
    if mode == "prompt is more important":
        w = [0.825 ** (n - i) for i in range(n + 1)]
    else:
        top = sites[0].shape[-2]
        w = [top / t.shape[-2] for t in sites]
    for x, y, wi in zip(sites, other["output"] + other["middle"], w):
        torch.testing.assert_close(y, x * wi, rtol=1e-6, atol=0)
    assert spy_calls(host, "mode")[0]["cond_or_uncond"] in ([0, 1], [1, 0])


def builtin_apply(g, pos, neg, cn, img, strength=1.0):
    n = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=cn, image=img, strength=strength, start_percent=0.0, end_percent=1.0)
    return (n, 0), (n, 1)


@pytest.mark.compat
def test_our_loader_and_apply_match_the_builtin_pair_and_interoperate(host):
    results = {}
    for combo in ("ours+ours", "builtin+builtin", "ours+builtin", "builtin+ours"):
        g, model, pos, neg, latent = base_graph(host)
        load_kind, apply_kind = combo.split("+")
        cn = loader(g) if load_kind == "ours" else (g.add("ControlNetLoader", control_net_name="cn_a.safetensors"), 0)
        img = image(g)
        pos, neg = apply(g, pos, neg, cn, img) if apply_kind == "ours" else builtin_apply(g, pos, neg, cn, img)
        results[combo] = host.run(finish(g, model, pos, neg, latent))["out"]
    ref = results["builtin+builtin"]
    plain = run_plain(host)
    assert not torch.allclose(ref, plain, atol=1e-3)
    for combo, out in results.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=combo)


def test_wrong_family_stops_before_sampling_with_both_names(host):
    host.spy.clear()
    with pytest.raises(PromptFailed) as e:
        run_one(host, name="cn_sdxl.safetensors", spy="wrong")
    msg = str(e.value)
    assert "cn_sdxl.safetensors" in msg and "SD15" in msg and "does not fit" in msg
    assert spy_calls(host, "wrong") == []  # no UNet step ran


def test_missing_model_file_is_a_clear_error(host):
    g, model, pos, neg, latent = base_graph(host)
    pos, neg = apply(g, pos, neg, loader(g, "nope.safetensors"), image(g))
    with pytest.raises(PromptInvalid):
        host.run(finish(g, model, pos, neg, latent))
    cls = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteLoader"]
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*controlnet model folders"):
        cls().load("nope.safetensors")


def test_bad_file_in_the_folder_names_it(host):
    (host.dirs["controlnet"] / "broken.safetensors").write_text("<html>login</html>")
    with pytest.raises(PromptFailed, match="broken.safetensors.*HTML"):
        run_one(host, name="broken.safetensors")


@pytest.mark.parametrize("kind", ["gray", "rgba", "wide", "tall", "batch2", "batch3-latent2"])
def test_hints_of_other_size_channels_and_batch(host, kind):
    size = dict(w=64, h=64, channels=3, batch=1)
    latent_batch = 1
    size.update({"gray": dict(channels=1), "rgba": dict(channels=4), "wide": dict(w=150, h=40), "tall": dict(w=30, h=90),
                 "batch2": dict(batch=2), "batch3-latent2": dict(batch=3)}[kind])
    if kind == "batch3-latent2":
        latent_batch = 2
    outs = {}
    for resize in ("stretch", "crop and resize", "resize and pad"):
        g, model, pos, neg, latent = base_graph(host, batch=latent_batch)
        pos, neg = apply(g, pos, neg, loader(g), image(g, **size), resize=resize)
        outs[resize] = host.run(finish(g, model, pos, neg, latent))["out"]
        assert outs[resize].shape[0] == latent_batch and torch.isfinite(outs[resize]).all()
    if kind in ("wide", "tall"):
        assert not torch.equal(outs["stretch"], outs["crop and resize"]) and not torch.equal(outs["crop and resize"], outs["resize and pad"])


def test_node_metadata_tooltips_and_descriptions(host):
    from nodes import NODE_CLASS_MAPPINGS as M  # ComfyUI's registry

    control = {"ControlNetSuiteLoader", "ControlNetSuiteApply", "ControlNetSuiteStack", "ControlNetSuiteApplyStack", "ControlNetSuiteUnion"}
    assert control <= set(M)
    ours = {k: M[k] for k in control}  # annotator nodes are checked in test_annotator_nodes.py
    for name, cls in ours.items():
        assert cls.DESCRIPTION and cls.CATEGORY in ("loaders", "conditioning/controlnet")
        for section in cls.INPUT_TYPES().values():
            for inp, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_diff_controlnet_through_the_loader_needs_and_uses_the_model(host):
    from factories import save
    from safetensors.torch import load_file

    base = {k[len("model.diffusion_model."):]: v for k, v in load_file(host.dirs["checkpoints"] / host.checkpoint).items()
            if k.startswith("model.diffusion_model.")}
    absolute = load_file(host.dirs["controlnet"] / "cn_b.safetensors")
    diff = {"control_model." + k: (v - base[k] if k in base else v) for k, v in absolute.items()}
    diff["difference"] = torch.tensor([])
    save(host.dirs["controlnet"] / "diff_cn_b.safetensors", diff)

    with pytest.raises(PromptFailed, match="base model"):
        run_one(host, name="diff_cn_b.safetensors")
    g, model, pos, neg, latent = base_graph(host)
    cn = (g.add("ControlNetSuiteLoader", control_net_name="diff_cn_b.safetensors", model=model), 0)
    pos, neg = apply(g, pos, neg, cn, image(g))
    via_diff = host.run(finish(g, model, pos, neg, latent))["out"]
    torch.testing.assert_close(via_diff, run_one(host, name="cn_b.safetensors"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field", ["strength", "start", "end"])
def test_nan_settings_stop_with_a_message_before_sampling(host, field):
    """NaN passes ComfyUI's own min/max validation; it used to end as a black image (strength) or an index error
    inside KSampler (start_percent)."""
    name = {"strength": "strength", "start": "start_percent", "end": "end_percent"}[field]
    with pytest.raises(PromptFailed, match=rf"Apply ControlNet \(Suite\).*{name} is nan; it must be a finite number"):
        run_one(host, **{field: float("nan")})


def test_nan_mask_and_nan_stack_strength_stop_with_a_message(host):
    g, model, pos, neg, latent = base_graph(host)
    nan_mask = (g.add("SolidMask", value=float("nan"), width=64, height=64), 0)
    pos, neg = apply(g, pos, neg, loader(g), image(g), mask=nan_mask)
    with pytest.raises(PromptFailed, match=r"'mask' holds NaN or infinite values"):
        host.run(finish(g, model, pos, neg, latent))
    g, model, pos, neg, latent = base_graph(host)
    st = g.add("ControlNetSuiteStack", control_net=loader(g), image=image(g), strength=float("nan"), start_percent=0.0, end_percent=1.0,
               control_mode="balanced", resize_mode="crop and resize")
    ap = g.add("ControlNetSuiteApplyStack", positive=pos, negative=neg, stack=(st, 0))
    with pytest.raises(PromptFailed, match=r"Stack.*strength is nan"):
        host.run(finish(g, model, (ap, 0), (ap, 1), latent))
