"""Strength, per-block scales and composition are core functions with exact, documented maths."""
import pytest
import torch
from factories import SD15_TINY, inputs, random_controlnet

from controlnet_core import ControlResiduals, add, cfg_resolution_weights, combine, scale, soft_weights


def res(seed, n=4, shape=(2, 8, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return ControlResiduals(tuple(torch.randn(shape, generator=g) for _ in range(n)), torch.randn(shape, generator=g))


def test_strength_and_block_scales():
    r = res(0)
    s = scale(r, 0.5, [1.0, 2.0, 0.0, 1.0, 4.0])
    assert torch.equal(s.down[1], r.down[1] * 1.0) and torch.equal(s.down[0], r.down[0] * 0.5)
    assert torch.count_nonzero(s.down[2]) == 0 and torch.equal(s.mid, r.mid * 2.0)
    with pytest.raises(ValueError, match="5"):
        scale(r, 1.0, [1.0, 1.0])


def test_strength_zero_gives_zero_and_one_is_identity():
    r = res(1)
    assert all(torch.count_nonzero(t) == 0 for t in scale(r, 0.0).tensors())
    assert all(a is b for a, b in zip(scale(r, 1.0).tensors(), r.tensors()))


def test_soft_weights_are_the_original_repos_guess_mode_scales():
    w = soft_weights(13)
    assert w == [0.825 ** (12 - i) for i in range(13)] and w[-1] == 1.0


def test_cfg_resolution_weights_follow_the_paper():
    model = random_controlnet(SD15_TINY)
    with torch.no_grad():
        r = model(*inputs(SD15_TINY, latent=16)[:4])
    w = cfg_resolution_weights([t.shape for t in r.down], r.mid.shape)
    assert w == [1.0, 1.0, 2.0, 2.0, 2.0]
    # at 512 px SD1.5 (latent 64): exactly 64 / h_i, from 1 at the top to 8 at the middle block
    sd15 = [(1, 320, 64, 64)] * 3 + [(1, 320, 32, 32)] * 3 + [(1, 640, 16, 16)] * 3 + [(1, 1280, 8, 8)] * 3
    assert cfg_resolution_weights(sd15, (1, 1280, 8, 8)) == [64 / s[-2] for s in sd15] + [8.0]


def test_several_controls_add_site_by_site():
    a, b, c = res(1), res(2), res(3)
    s = combine([a, b, c])
    for k in range(4):
        assert torch.equal(s.down[k], a.down[k] + b.down[k] + c.down[k])
    assert torch.equal(s.mid, a.mid + b.mid + c.mid)
    t2i = ControlResiduals(input=(None, None, torch.ones(2, 8, 4, 4)))
    mixed = add(a, t2i)
    assert mixed.down == a.down and torch.equal(mixed.input[2], torch.ones(2, 8, 4, 4))
    with pytest.raises(ValueError, match="different latents"):
        add(a, res(4, shape=(2, 8, 8, 8)))
