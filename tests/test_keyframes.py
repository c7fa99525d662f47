"""controlnet_core.keyframes alone (no host): timestep schedules by sigma, per-frame strengths, validation."""
import math

import pytest
import torch

from controlnet_core.keyframes import (
    KeyframeError,
    LatentKeyframe,
    LatentKeyframes,
    TimestepKeyframe,
    TimestepKeyframes,
    curve,
    parse_block_weights,
    parse_frames,
    weigh_frames,
)
from controlnet_core.residuals import ControlResiduals


def percent_to_sigma(p: float) -> float:
    """A stand-in for the host's mapping: 0 -> a huge sigma, 1 -> 0, strictly falling (as ModelSamplingDiscrete's)."""
    if p <= 0.0:
        return 999999999.9
    if p >= 1.0:
        return 0.0
    return 14.6 * (1.0 - p) ** 2 + 0.03 * (1.0 - p)


def sigma_at(p: float) -> float:
    """The sigma of a sampling step at percent p (the first step sits at the model's sigma_max, below 'percent 0')."""
    return 14.6 * (1.0 - p) ** 2 + 0.03 * (1.0 - p)


def chain(*kfs) -> TimestepKeyframes:
    out = TimestepKeyframes()
    for k in kfs:
        out = out.add(k)
    return out


def test_hold_switches_at_the_start_percent_like_the_host_window():
    sched = chain(TimestepKeyframe(0.0, 1.0), TimestepKeyframe(0.5, 0.0)).bind(percent_to_sigma)
    assert sched.at(sigma_at(0.0)).strength == 1.0
    assert sched.at(sigma_at(0.49)).strength == 1.0
    assert sched.at(percent_to_sigma(0.5)).strength == 0.0  # inclusive, as the host's start_percent
    assert sched.at(sigma_at(0.51)).strength == 0.0 and sched.at(0.0).strength == 0.0


def test_before_the_first_keyframe_the_multiplier_is_one():
    sched = chain(TimestepKeyframe(0.3, 0.25)).bind(percent_to_sigma)
    s = sched.at(sigma_at(0.1))
    assert s.strength == 1.0 and s.index == -1
    assert sched.at(sigma_at(0.3)).strength == 0.25 and sched.at(sigma_at(0.9)).index == 0


@pytest.mark.parametrize("interp, expect", [
    ("linear", lambda f: f),
    ("ease-in", lambda f: f * f),
    ("ease-out", lambda f: 1 - (1 - f) ** 2),
    ("ease-in-out", lambda f: (1 - math.cos(math.pi * f)) / 2),
])
def test_interpolated_strength_at_known_percents(interp, expect):
    sched = chain(TimestepKeyframe(0.2, 1.0, interp), TimestepKeyframe(0.6, 0.2)).bind(percent_to_sigma)
    for p in (0.2, 0.3, 0.4, 0.5, 0.599):
        f = (p - 0.2) / 0.4
        assert sched.at(sigma_at(p)).strength == pytest.approx(1.0 + (0.2 - 1.0) * expect(f), abs=1e-6)
    assert sched.at(sigma_at(0.7)).strength == 0.2  # the last keyframe holds
    assert sched.at(sigma_at(0.2)).strength == 1.0  # exactly its own strength where it starts


def test_curve_endpoints_and_hold():
    for name in ("linear", "ease-in", "ease-out", "ease-in-out"):
        assert curve(0.0, name) == 0.0 and curve(1.0, name) == pytest.approx(1.0)
    assert curve(0.7, "hold") == 0.0
    assert curve(0.5, "ease-in") < curve(0.5, "linear") < curve(0.5, "ease-out")


def test_chaining_sorts_and_a_keyframe_at_the_same_percent_replaces():
    kfs = chain(TimestepKeyframe(0.8, 0.1), TimestepKeyframe(0.2, 0.5), TimestepKeyframe(0.8, 0.3))
    assert [(k.start_percent, k.strength) for k in kfs.keyframes] == [(0.2, 0.5), (0.8, 0.3)]
    first = TimestepKeyframes().add(TimestepKeyframe(0.0, 0.5))
    second = first.add(TimestepKeyframe(0.5, 0.0))
    assert len(first) == 1 and len(second) == 2  # chaining copies: an upstream node's output is never changed


def test_block_weights_and_masks_are_inherited_unless_told_not_to():
    mask = torch.ones(1, 4, 4)
    kfs = chain(TimestepKeyframe(0.0, 1.0, block_weights=(1.0, 0.5), mask=mask), TimestepKeyframe(0.3, 0.8),
                TimestepKeyframe(0.6, 0.6, inherit_missing=False))
    sched = kfs.bind(percent_to_sigma)
    a, b, c = sched.at(sigma_at(0.1)), sched.at(sigma_at(0.4)), sched.at(sigma_at(0.7))
    assert a.block_weights == b.block_weights == (1.0, 0.5) and a.mask is mask and b.mask is mask
    assert c.block_weights is None and c.mask is None


@pytest.mark.parametrize("kw, words", [
    (dict(start_percent=1.5), "within 0 to 1"),
    (dict(start_percent=-0.1), "within 0 to 1"),
    (dict(start_percent=float("nan")), "within 0 to 1"),
    (dict(start_percent=0.2, strength=11.0), "0 to 10"),
    (dict(start_percent=0.2, interpolation="cubic"), "expected one of"),
    (dict(start_percent=0.2, mask=torch.ones(4)), "mask"),
])
def test_timestep_keyframe_errors(kw, words):
    with pytest.raises(KeyframeError, match=words):
        TimestepKeyframe(**kw)


def test_block_weights_text():
    assert parse_block_weights("") is None and parse_block_weights("  ") is None
    assert parse_block_weights("1, 0.5;0") == (1.0, 0.5, 0.0)
    with pytest.raises(KeyframeError, match="not a number"):
        parse_block_weights("1, x")
    with pytest.raises(KeyframeError, match=">= 0"):
        parse_block_weights("-1")


# -- latent keyframes --


def test_python_style_frames_with_negative_indices_and_default_strength():
    lk = LatentKeyframes(default_strength=0.25).add(LatentKeyframe("0", 1.0)).add(LatentKeyframe("-1", 0.5))
    assert lk.strengths(4) == [1.0, 0.25, 0.25, 0.5]
    lk = LatentKeyframes().add(LatentKeyframe("-3:", 0.7))
    assert lk.strengths(5) == [0.0, 0.0, 0.7, 0.7, 0.7]
    assert LatentKeyframes().add(LatentKeyframe("::2", 1.0)).strengths(5) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert LatentKeyframes().add(LatentKeyframe("1:100", 1.0)).strengths(3) == [0.0, 1.0, 1.0]  # a range is cut, as in Python
    assert LatentKeyframes().add(LatentKeyframe("0, -1", 1.0)).strengths(3) == [1.0, 0.0, 1.0]


def test_later_keyframes_win_and_the_last_default_counts():
    lk = LatentKeyframes().add(LatentKeyframe("0:4", 1.0), 0.1).add(LatentKeyframe("2", 0.0), 0.3)
    assert lk.strengths(5) == [1.0, 1.0, 0.0, 1.0, 0.3]


def test_interpolation_between_frames():
    lk = LatentKeyframes().add(LatentKeyframe("0:5", 1.0, 0.0, "linear"))
    assert lk.strengths(5) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    ease = LatentKeyframes().add(LatentKeyframe("0:3", 0.0, 1.0, "ease-in")).strengths(3)
    assert ease == pytest.approx([0.0, 0.25, 1.0])
    held = LatentKeyframes().add(LatentKeyframe("0:3", 0.4, 1.0, "hold")).strengths(3)
    assert held == [0.4, 0.4, 0.4]
    assert LatentKeyframes().add(LatentKeyframe("-1:-4:-1", 1.0, 0.0, "linear")).strengths(3) == pytest.approx([0.0, 0.5, 1.0])


def test_multipliers_follow_cond_uncond_chunks():
    lk = LatentKeyframes(default_strength=1.0).add(LatentKeyframe("1", 0.0))
    m = lk.multipliers(6, 2)
    assert m.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(KeyframeError, match="equal chunks"):
        lk.multipliers(5, 2)


@pytest.mark.parametrize("text, frames, words", [
    ("4", 4, "frame 4 is outside this batch of 4 frames"),
    ("-5", 4, "frame -5 is outside"),
    ("6:9", 4, "selects no frame"),
])
def test_frames_outside_the_batch_are_errors(text, frames, words):
    with pytest.raises(KeyframeError, match=words):
        LatentKeyframes().add(LatentKeyframe(text, 1.0)).strengths(frames)


@pytest.mark.parametrize("text, words", [("", "empty"), ("a", "not a frame index"), ("1:2:3:4", "not a frame index"),
                                         ("::0", "step 0"), ("1.5", "not a frame index")])
def test_malformed_frames(text, words):
    with pytest.raises(KeyframeError, match=words):
        parse_frames(text)


def test_latent_strength_bounds():
    with pytest.raises(KeyframeError, match="0 to 10"):
        LatentKeyframe("0", -1.0)
    with pytest.raises(KeyframeError, match="default_strength"):
        LatentKeyframes(default_strength=float("inf"))


def test_weigh_frames_keeps_shared_tensors_shared():
    t = torch.ones(4, 2, 3, 3)
    res = ControlResiduals((t, t), torch.ones(4, 5, 1, 1))
    out = weigh_frames(res, torch.tensor([1.0, 0.0, 0.5, 2.0]))
    assert out.down[0] is out.down[1]
    assert out.down[0][:, 0, 0, 0].tolist() == [1.0, 0.0, 0.5, 2.0] and out.mid[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.5, 2.0]
    tokens = weigh_frames(ControlResiduals((torch.ones(2, 6, 3),), token_grid=(2, 3)), torch.tensor([0.0, 1.0]))
    assert tokens.down[0][0].abs().sum() == 0 and tokens.down[0][1].sum() == 18
