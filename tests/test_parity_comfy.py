"""Parity with ComfyUI's built-in ControlNet (`comfy.cldm`) on the same random weights, fp32, rel. err <= 1e-5."""
import pytest
import torch
from factories import SD15, SD15_320, SD15_TINY, SD21_TINY, SDXL_TINY, comfy_cldm, comfy_control_outputs, inputs, random_controlnet, rel_err, save

from controlnet_core import load_control

TOL = 1e-5
pytestmark = pytest.mark.compat  # every host, the oldest included, gives the same numbers


def assert_parity(ours, theirs_down, theirs_mid):
    assert len(ours.down) == len(theirs_down)
    for k, (a, b) in enumerate(zip(ours.down, theirs_down)):
        assert a.shape == b.shape, f"down[{k}]"
        assert rel_err(a, b) <= TOL, f"down[{k}] rel err {rel_err(a, b):.2e}"
    assert rel_err(ours.mid, theirs_mid) <= TOL


@pytest.mark.parametrize("cfg", [SD15_320, SD21_TINY, SDXL_TINY], ids=["sd15-shaped-320", "sd21-shaped-64", "sdxl-shaped-64"])
@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["v1.1", "stripped"])
def test_same_file_through_comfy_loader_and_ours(comfy, tmp_path, cfg, prefix):
    import comfy.controlnet

    ref = random_controlnet(cfg, seed=3)
    path = save(tmp_path / "cn.safetensors", {prefix + k: v for k, v in ref.state_dict().items()})
    theirs = comfy.controlnet.load_controlnet(str(path)).control_model.float()
    ours = load_control(path)
    assert ours.format == ("ldm-v1.1" if prefix else "ldm")
    args = inputs(cfg, batch=2, latent=8)
    with torch.no_grad():
        assert_parity(ours.residuals(*args), *comfy_control_outputs(theirs, *args))


def test_scaled_down_sd15_matches_comfy_cldm(comfy):
    ours = random_controlnet(SD15_TINY, seed=4)
    theirs = comfy_cldm(SD15_TINY)
    theirs.load_state_dict(ours.state_dict())
    args = inputs(SD15_TINY, batch=3, latent=16)
    with torch.no_grad():
        assert_parity(ours(*args), *comfy_control_outputs(theirs, *args))


def test_full_size_sd15_matches_comfy_once(comfy, tmp_path):
    """Full SD1.5 shapes (361 M random parameters), one forward at 256 px."""
    import comfy.controlnet

    ref = random_controlnet(SD15, seed=5)
    path = save(tmp_path / "control_sd15_random.safetensors", ref.state_dict())
    del ref
    ours = load_control(path)
    theirs = comfy.controlnet.load_controlnet(str(path)).control_model.float()
    args = inputs(SD15, batch=1, latent=32, tokens=77)
    with torch.no_grad():
        assert_parity(ours.residuals(*args), *comfy_control_outputs(theirs, *args))
