"""Issue 12, items 2 and 3 in the apply path: the hint's memory bound, and residuals that turn NaN during sampling.

Through the real host where a user meets them; the library functions on their own where the edge needs no host.
"""
import time

import pytest
import torch
from factories import random_controlnet, save
from host import TINY_UNET, PromptFailed, base_graph, finish
from test_nodes import apply, image, loader

from controlnet_core import ControlResiduals, LimitExceededError, all_finite, check_hint_size, prepare_hint

# -- the hint bound, library --

def test_a_hint_above_the_limit_is_refused_before_any_allocation():
    img = torch.rand(1, 3, 16, 16)
    t0 = time.perf_counter()
    with pytest.raises(LimitExceededError) as e:
        prepare_hint(img, 100_000, 100_000, 3, 2)  # 10,000 megapixels: 120 GB as float RGB
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert "100000x100000" in msg and "10000.0 megapixels per image" in msg and "limit of 67.11" in msg
    assert "CNS_MAX_HINT_MEGAPIXELS" in msg and "Sample smaller" in msg


def test_the_per_call_limit_counts_the_batch(monkeypatch):
    check_hint_size(4096, 4096, 8)  # 134.2 MP per call: the largest default batch at 4096 px
    with pytest.raises(LimitExceededError, match=r"151.0 megapixels per sampling call, above the limit of 134.2.*CNS_MAX_HINT_BATCH_MEGAPIXELS"):
        check_hint_size(6144, 6144, 4)
    monkeypatch.setenv("CNS_MAX_HINT_BATCH_MEGAPIXELS", "200")
    check_hint_size(6144, 6144, 4)


@pytest.mark.parametrize("value", ["0", "-1", "lots", "nan"])
def test_a_bad_limit_variable_is_named(monkeypatch, value):
    monkeypatch.setenv("CNS_MAX_HINT_MEGAPIXELS", value)
    with pytest.raises(LimitExceededError, match=rf"CNS_MAX_HINT_MEGAPIXELS='{value}' is not a positive number"):
        check_hint_size(64, 64, 1)


# -- the finite check, library --

def test_all_finite_finds_one_nan_or_inf_in_any_site():
    ok = ControlResiduals((torch.ones(1, 4, 8, 8), None), torch.zeros(1, 4, 2, 2), (torch.ones(1, 4, 8, 8),))
    assert all_finite(ok) and all_finite(ControlResiduals())
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(1, 4, 8, 8)
        t[0, 2, 3, 5] = bad
        assert not all_finite(ControlResiduals((torch.ones(1, 4, 8, 8), t), None))
        assert not all_finite(ControlResiduals((), None, (t.half(),)))


# -- through the host --

def test_an_enormous_latent_stops_with_the_limit_not_the_oom_killer(host):
    """EmptyLatentImage's widgets reach 16384 px: the hint would be 3.2 GB and the control's activations tens of GB."""
    for builtin in (False, True):
        g, model, pos, neg, latent = base_graph(host, size=16384)
        cn = (g.add("ControlNetLoader", control_net_name="cn_a.safetensors"), 0) if builtin else loader(g)
        pos, neg = apply(g, pos, neg, cn, image(g))
        t0 = time.perf_counter()
        with pytest.raises(PromptFailed, match=r"16384x16384 pixels.*268.4 megapixels per image, above the limit of 67.11"):
            host.run(finish(g, model, pos, neg, latent, steps=1))
        assert time.perf_counter() - t0 < 60


def test_the_limit_variable_applies_to_the_running_host(host, monkeypatch):
    monkeypatch.setenv("CNS_MAX_HINT_BATCH_MEGAPIXELS", "0.005")  # a 64 px latent batch of 2: 0.008 MP per call
    g, model, pos, neg, latent = base_graph(host, batch=2)
    pos, neg = apply(g, pos, neg, loader(g), image(g))
    with pytest.raises(PromptFailed, match=r"cn_a.safetensors: sampling at 64x64 pixels.*per sampling call.*CNS_MAX_HINT_BATCH_MEGAPIXELS"):
        host.run(finish(g, model, pos, neg, latent))
    monkeypatch.delenv("CNS_MAX_HINT_BATCH_MEGAPIXELS")
    out = host.run(finish(g, model, pos, neg, latent))["out"]
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def overflowing(host):
    """Finite weights (so the load-time check passes) that overflow float32 in the hint encoder: inf, then NaN."""
    sd = random_controlnet(TINY_UNET, seed=4).state_dict()
    sd = {k: v * 1e18 if k.startswith("input_hint_block") and k.endswith("weight") else v for k, v in sd.items()}
    assert all(torch.isfinite(v).all() for v in sd.values())
    return save(host.dirs["controlnet"] / "cn_overflow.safetensors", sd).name


def test_residuals_that_turn_nan_stop_sampling_naming_the_controlnet(host, overflowing):
    g, model, pos, neg, latent = base_graph(host)
    pos, neg = apply(g, pos, neg, loader(g, overflowing), image(g))
    with pytest.raises(PromptFailed, match=r"cn_overflow.safetensors: its residuals turned NaN or infinite at sigma .* from a finite latent "
                                           r"\(weights in torch.float32\).*wider precision"):
        host.run(finish(g, model, pos, neg, latent))


def test_in_a_stack_the_overflowing_unit_is_the_one_named(host, overflowing):
    g, model, pos, neg, latent = base_graph(host)
    st = None
    for name in ("cn_a.safetensors", overflowing, "cn_b.safetensors"):
        kw = {"stack": (st, 0)} if st else {}
        st = g.add("ControlNetSuiteStack", control_net=loader(g, name), image=image(g), strength=1.0, start_percent=0.0,
                   end_percent=1.0, control_mode="balanced", resize_mode="crop and resize", **kw)
    ap = g.add("ControlNetSuiteApplyStack", positive=pos, negative=neg, stack=(st, 0))
    with pytest.raises(PromptFailed) as e:
        host.run(finish(g, model, (ap, 0), (ap, 1), latent))
    assert "cn_overflow.safetensors: its residuals turned NaN" in str(e.value)
    assert "cn_a.safetensors" not in str(e.value) and "cn_b.safetensors" not in str(e.value)


# -- masks: only the frames a latent chunk uses are resized --

def _reference_mask(mask, t, batched_number):
    import torch.nn.functional as F

    from controlnet_core.hint import match_batch
    r = F.interpolate(mask[:, None].float(), size=t.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    return match_batch(r, t.shape[0], "mask", batched_number)


@pytest.mark.parametrize("masks,batch,batched_number", [(3, 4, 2), (1, 4, 2), (5, 2, 1), (2, 6, 2), (3, 3, 2), (1000, 2, 2)])
def test_masks_per_frame_are_the_same_as_resizing_the_whole_batch(masks, batch, batched_number):
    from controlnet_core import mask_residuals
    g = torch.Generator().manual_seed(masks)
    mask = torch.rand(masks, 40, 56, generator=g)
    res = ControlResiduals((torch.ones(batch, 2, 10, 14), torch.ones(batch, 2, 5, 7)), torch.ones(batch, 2, 3, 4))
    out = mask_residuals(res, mask, batched_number)
    for got, t in zip(out.tensors(), res.tensors()):
        torch.testing.assert_close(got, t * _reference_mask(mask, t, batched_number), rtol=0, atol=1e-6)
