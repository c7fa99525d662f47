"""The paper's "trainable copy": a ControlNet created from a base UNet changes nothing until trained."""
import pytest
import torch
from factories import SD15_TINY, SDXL_TINY, comfy_control_dict, comfy_unet, inputs, save

from controlnet_core import create_from_unet, load_control, save_ldm


@pytest.mark.parametrize("cfg", [SD15_TINY, SDXL_TINY], ids=["sd15-shaped", "sdxl-shaped"])
def test_zero_initialised_controlnet_leaves_the_unet_bit_identical(comfy, tmp_path, cfg):
    unet = comfy_unet(cfg, seed=21)
    ckpt = save(tmp_path / "base.safetensors", {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    cn = create_from_unet(ckpt, seed=0)
    assert cn.config.adm_in_channels == cfg.adm_in_channels and cn.config.level_channels == cfg.level_channels
    # encoder and middle block are copies of the UNet's
    usd = unet.state_dict()
    for k, v in cn.state_dict().items():
        if k.startswith(("input_blocks.", "middle_block.", "time_embed.", "label_emb.")):
            assert torch.equal(v, usd[k]), k
    x, hint, t, ctx, y = inputs(cfg, batch=2, latent=8)
    with torch.no_grad():
        res = cn(x, hint, t, ctx, y)
        assert all(torch.count_nonzero(r) == 0 for r in res.tensors())
        plain = unet(x, t, ctx, y)
        controlled = unet(x, t, ctx, y, control=comfy_control_dict(res))
    assert torch.equal(plain, controlled)
    # and the saved file loads as a normal ControlNet
    back = load_control(save_ldm(cn, tmp_path / "created.safetensors"))
    assert back.config == cn.config


def test_hint_encoder_is_trainable_but_its_last_conv_is_zero(comfy):
    cn = create_from_unet(comfy_unet(SD15_TINY).state_dict())
    assert torch.count_nonzero(cn.input_hint_block[-1].weight) == 0
    assert torch.count_nonzero(cn.input_hint_block[0].weight) > 0
