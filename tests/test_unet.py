"""Our ldm UNet (used for training) equals ComfyUI's UNetModel on the same weights, with and without control."""
import pytest
import torch
from factories import SD15_TINY, SDXL_TINY, comfy_control_dict, comfy_unet, inputs, random_controlnet, rel_err

from controlnet_core import ControlResiduals, create_from_unet
from controlnet_core.unet import unet_from_state_dict


@pytest.mark.parametrize("cfg", [SD15_TINY, SDXL_TINY], ids=["sd15-shaped", "sdxl-shaped"])
@pytest.mark.parametrize("latent", [8, 10])
def test_unet_matches_comfy(comfy, cfg, latent):
    theirs = comfy_unet(cfg, seed=3)
    ours = unet_from_state_dict(theirs.state_dict())
    cn = random_controlnet(cfg, seed=4)
    x, hint, t, ctx, y = inputs(cfg, batch=2, latent=latent)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx, y), theirs(x, t, ctx, y)) <= 1e-5
        res = cn(x, hint, t, ctx, y)
        a = ours(x, t, ctx, y, control=res)
        b = theirs(x, t, ctx, y, control=comfy_control_dict(res))
        assert rel_err(a, b) <= 1e-5 and rel_err(a, ours(x, t, ctx, y)) > 1e-3


def test_zero_control_is_bit_identical(comfy):
    unet = unet_from_state_dict(comfy_unet(SD15_TINY, seed=1).state_dict())
    cn = create_from_unet(unet.state_dict())
    x, hint, t, ctx, y = inputs(SD15_TINY)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, control=cn(x, hint, t, ctx)), unet(x, t, ctx, control=ControlResiduals()))
