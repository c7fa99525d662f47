"""Timestep and latent keyframes through the real host: keyframe nodes -> apply / stack nodes -> KSampler."""
import ast
import logging
import re

import pytest
import torch
from host import PromptFailed, base_graph, finish
from test_nodes import apply, image, loader, run_plain, spy_calls


def timestep_kf(g, start, strength, *, interpolation="hold", previous=None, block_weights="", inherit=True, mask=None):
    kw = dict(start_percent=start, strength=strength, interpolation=interpolation, block_weights=block_weights, inherit_missing=inherit)
    if previous is not None:
        kw["previous"] = previous
    if mask is not None:
        kw["mask"] = mask
    return (g.add("ControlNetSuiteTimestepKeyframe", **kw), 0)


def latent_kf(g, frames, strength, *, strength_end=1.0, interpolation="hold", default=0.0, previous=None):
    kw = dict(frames=frames, strength=strength, strength_end=strength_end, interpolation=interpolation, default_strength=default)
    if previous is not None:
        kw["previous"] = previous
    return (g.add("ControlNetSuiteLatentKeyframe", **kw), 0)


def run_keyframed(host, make_kf, *, batch=1, spy=None, latent=None, **apply_kw):
    g, model, pos, neg, lat = base_graph(host, batch=batch, spy_tag=spy)
    kw = dict(apply_kw)
    tk = make_kf(g) if make_kf else None
    lk = latent(g) if latent else None
    pos, neg = apply(g, pos, neg, loader(g), image(g), **kw)
    node = g.prompt[pos[0]]["inputs"]
    if tk is not None:
        node["timestep_keyframes"] = list(tk)
    if lk is not None:
        node["latent_keyframes"] = list(lk)
    return host.run(finish(g, model, pos, neg, lat))["out"]


def run_window(host, *, start=0.0, end=1.0, strength=1.0, batch=1):
    g, model, pos, neg, lat = base_graph(host, batch=batch)
    pos, neg = apply(g, pos, neg, loader(g), image(g), start=start, end=end, strength=strength)
    return host.run(finish(g, model, pos, neg, lat))["out"]


def test_strength_one_then_zero_at_half_equals_the_end_percent_window(host):
    """4 steps of the normal schedule sit at percents 0, 1/3, 2/3, 1: the keyframe at 0.5 and end_percent 0.5 cut alike."""
    keyed = run_keyframed(host, lambda g: timestep_kf(g, 0.5, 0.0, previous=timestep_kf(g, 0.0, 1.0)))
    window = run_window(host, start=0.0, end=0.5)
    assert torch.equal(keyed, window)
    assert not torch.equal(keyed, run_plain(host)) and not torch.equal(keyed, run_window(host))


def test_keyframe_strength_one_is_bit_identical_to_no_keyframes(host):
    assert torch.equal(run_keyframed(host, lambda g: timestep_kf(g, 0.0, 1.0), strength=0.7), run_window(host, strength=0.7))


def test_keyframe_strength_zero_throughout_is_bit_identical_to_no_control(host):
    assert torch.equal(run_keyframed(host, lambda g: timestep_kf(g, 0.0, 0.0)), run_plain(host))


def test_held_keyframe_strength_multiplies_the_unit_strength(host):
    """A keyframe of 0.5 on strength 0.8 is strength 0.4 on every step (0.8 * 0.5 is exactly 0.4 in binary)."""
    assert torch.equal(run_keyframed(host, lambda g: timestep_kf(g, 0.0, 0.5), strength=0.8), run_window(host, strength=0.4))


def test_linear_interpolation_gives_intermediate_strengths_per_call(host, caplog):
    """Linear from 1 at 0% to 0 at 100%: the calls at percents 0, 1/3, 2/3, 1 get 1, 2/3, 1/3, 0 (the adapter logs each
    call's multiplier at debug level)."""
    caplog.set_level(logging.DEBUG)
    out = run_keyframed(host, lambda g: timestep_kf(g, 1.0, 0.0, previous=timestep_kf(g, 0.0, 1.0, interpolation="linear")))
    got = [float(m.group(1)) for m in re.finditer(r"timestep keyframe \d+ in effect at sigma \S+, strength x (\S+)", caplog.text)]
    assert len(got) == 4
    assert got == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0], abs=1e-4)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, run_window(host)) and not torch.equal(out, run_plain(host))


def test_ease_curves_differ_from_linear(host):
    outs = {}
    for interp in ("linear", "ease-in", "ease-out"):
        outs[interp] = run_keyframed(host, lambda g, i=interp: timestep_kf(g, 1.0, 0.0, previous=timestep_kf(g, 0.0, 1.0, interpolation=i)))
    assert not torch.equal(outs["linear"], outs["ease-in"]) and not torch.equal(outs["linear"], outs["ease-out"])


def sites(host) -> int:
    """Injection sites of the tiny model (skip connections + the middle block), read off one controlled call."""
    host.spy.clear()
    run_keyframed(host, None, spy="sites")
    control = spy_calls(host, "sites")[0]["control"]
    return len(control["output"]) + len(control["middle"])


def test_keyframe_block_weights_replace_the_mode_weights(host):
    """Weights of 1 everywhere turn 'prompt is more important' into balanced; the prompt mode's own weights, given as
    block weights, turn balanced into that mode."""
    n = sites(host)
    ones = ", ".join(["1"] * n)
    a = run_keyframed(host, lambda g: timestep_kf(g, 0.0, 1.0, block_weights=ones), mode="prompt is more important")
    assert torch.equal(a, run_window(host))
    soft = ", ".join(repr(0.825 ** (n - 1 - i)) for i in range(n))
    b = run_keyframed(host, lambda g: timestep_kf(g, 0.0, 1.0, block_weights=soft))
    g, model, pos, neg, lat = base_graph(host)
    pos, neg = apply(g, pos, neg, loader(g), image(g), mode="prompt is more important")
    assert torch.equal(b, host.run(finish(g, model, pos, neg, lat))["out"])


def test_wrong_number_of_block_weights_is_a_clear_error(host):
    n = sites(host)
    with pytest.raises(PromptFailed, match=rf"block_weights.*has {n + 1} entries.*= {n}"):
        run_keyframed(host, lambda g: timestep_kf(g, 0.0, 1.0, block_weights=", ".join(["1"] * (n + 1))))


def test_keyframe_mask_of_zeros_turns_the_later_steps_off(host):
    """A zero mask from 50% on equals ending the window at 50%."""
    def kf(g):
        zeros = (g.add("SolidMask", value=0.0, width=64, height=64), 0)
        return timestep_kf(g, 0.5, 1.0, mask=zeros, previous=timestep_kf(g, 0.0, 1.0))

    assert torch.equal(run_keyframed(host, kf), run_window(host, end=0.5))


def test_latent_keyframe_zero_on_one_frame_leaves_it_uncontrolled(host):
    plain = run_plain(host, batch=3)
    full = run_window(host, batch=3)
    out = run_keyframed(host, None, batch=3, latent=lambda g: latent_kf(g, "1", 0.0, default=1.0))
    assert torch.equal(out[1], plain[1])
    assert torch.equal(out[0], full[0]) and torch.equal(out[2], full[2]) and not torch.equal(out[0], plain[0])
    last = run_keyframed(host, None, batch=3, latent=lambda g: latent_kf(g, "-1", 1.0))  # default 0: only the last frame
    assert torch.equal(last[0], plain[0]) and torch.equal(last[1], plain[1]) and torch.equal(last[2], full[2])


def test_latent_keyframes_through_the_stack(host):
    plain = run_plain(host, batch=2)
    g, model, pos, neg, lat = base_graph(host, batch=2)
    lk = latent_kf(g, "0", 0.0, default=1.0)
    stack = (g.add("ControlNetSuiteStack", control_net=loader(g), image=image(g), strength=1.0, start_percent=0.0, end_percent=1.0,
                   control_mode="balanced", resize_mode="crop and resize", latent_keyframes=lk), 0)
    n = g.add("ControlNetSuiteApplyStack", positive=pos, negative=neg, stack=stack)
    out = host.run(finish(g, model, (n, 0), (n, 1), lat))["out"]
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])


def test_latent_interpolation_gives_intermediate_frames(host, caplog):
    caplog.set_level(logging.DEBUG)
    run_keyframed(host, None, batch=3, latent=lambda g: latent_kf(g, "0:3", 1.0, strength_end=0.0, interpolation="linear"))
    rows = re.findall(r"latent keyframe strengths (\[[^\]]*\])", caplog.text)
    assert rows and all(ast.literal_eval(r) == [1.0, 0.5, 0.0, 1.0, 0.5, 0.0] for r in rows)  # cond and uncond chunks, one call each step


def test_frame_outside_the_batch_stops_with_a_message(host):
    with pytest.raises(PromptFailed, match="frame 5 is outside this batch of 2 frames"):
        run_keyframed(host, None, batch=2, latent=lambda g: latent_kf(g, "5", 1.0))


def test_node_tooltips_and_bad_input(host):
    M = host.nodes.NODE_CLASS_MAPPINGS
    for name in ("ControlNetSuiteTimestepKeyframe", "ControlNetSuiteLatentKeyframe"):
        cls = M[name]
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("conditioning/controlnet")
        for section in cls.INPUT_TYPES().values():
            for inp, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    for name in ("ControlNetSuiteApply", "ControlNetSuiteStack"):
        opt = list(M[name].INPUT_TYPES()["optional"])
        assert opt[-2:] == ["timestep_keyframes", "latent_keyframes"]  # last: saved workflows keep their inputs
    tk, lk = M["ControlNetSuiteTimestepKeyframe"](), M["ControlNetSuiteLatentKeyframe"]()
    with pytest.raises(ValueError, match=r"Timestep Keyframe \(Suite\).*start_percent is 1.5.*0 to 1"):
        tk.add(1.5, 1.0, "hold", "", True)
    with pytest.raises(ValueError, match=r"Latent Keyframe \(Suite\).*'x' is not a frame index"):
        lk.add("x", 1.0, 1.0, "hold", 0.0)
    with pytest.raises(ValueError, match=r"'previous' is a"):
        lk.add("0", 1.0, 1.0, "hold", 0.0, previous=tk.add(0.0, 1.0, "hold", "", True)[0])


def test_timestep_keyframes_through_the_stack_match_the_apply_node(host):
    g, model, pos, neg, lat = base_graph(host)
    tk = timestep_kf(g, 0.5, 0.0, previous=timestep_kf(g, 0.0, 1.0))
    stack = (g.add("ControlNetSuiteStack", control_net=loader(g), image=image(g), strength=1.0, start_percent=0.0, end_percent=1.0,
                   control_mode="balanced", resize_mode="crop and resize", timestep_keyframes=tk), 0)
    n = g.add("ControlNetSuiteApplyStack", positive=pos, negative=neg, stack=stack)
    assert torch.equal(host.run(finish(g, model, (n, 0), (n, 1), lat))["out"], run_window(host, end=0.5))
