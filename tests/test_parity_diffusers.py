"""Parity with diffusers' `ControlNetModel` on the same random weights (diffusers layouts), fp32, rel. err <= 1e-5."""
import json

import pytest
import torch
from factories import randomize_, rel_err, save

from controlnet_core import load_control, save_diffusers
from controlnet_core.layers import timestep_embedding

diffusers = pytest.importorskip("diffusers")
TOL = 1e-5

SD15_SHAPED = dict(
    block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1,
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)
SDXL_SHAPED = dict(
    block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=2,
    cross_attention_dim=64, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
)


def make(kwargs, seed=0):
    model = diffusers.ControlNetModel(**kwargs)
    return randomize_(model, seed).eval()


def run_both(ref, ours, sdxl: bool, batch=2, latent=8):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    hint = torch.rand(batch, 3, latent * 8, latent * 8, generator=g)
    t = torch.tensor([999.0, 37.0][:batch])
    ctx = torch.randn(batch, 5, 64, generator=g)
    added, y = None, None
    if sdxl:
        text = torch.randn(batch, 32, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
        added = {"text_embeds": text, "time_ids": time_ids}
        # the UNet's `y`: pooled text + sinusoidal size embedding, as the host builds it
        y = torch.cat([text, timestep_embedding(time_ids.flatten(), 8).reshape(batch, -1)], dim=1)
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False)
        res = ours.residuals(x, hint, t, ctx, y)
    assert len(res.down) == len(down)
    for k, (a, b) in enumerate(zip(res.down, down)):
        assert rel_err(a, b) <= TOL, f"down[{k}] rel err {rel_err(a, b):.2e}"
    assert rel_err(res.mid, mid) <= TOL
    return res


@pytest.mark.parametrize("kwargs, sdxl", [(SD15_SHAPED, False), (SDXL_SHAPED, True)], ids=["sd15-shaped", "sdxl-shaped"])
@pytest.mark.parametrize("with_config", [True, False], ids=["config.json", "weights-only"])
def test_diffusers_folder_matches_diffusers(tmp_path, kwargs, sdxl, with_config):
    ref = make(kwargs)
    folder = tmp_path / "cn"
    ref.save_pretrained(folder, safe_serialization=True)
    if not with_config:
        (folder / "config.json").unlink()
    ours = load_control(folder / "diffusion_pytorch_model.safetensors")
    assert ours.format == "diffusers"
    run_both(ref, ours, sdxl)


def test_diffusers_config_heads_are_honoured(tmp_path):
    """4 heads on 64 channels cannot be guessed from the weights: the config.json must decide."""
    ref = make(dict(SD15_SHAPED, attention_head_dim=4))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_control(tmp_path / "diffusion_pytorch_model.safetensors")
    assert ours.config.num_heads == 4
    run_both(ref, ours, sdxl=False)


@pytest.mark.parametrize("kwargs, sdxl", [(SD15_SHAPED, False), (SDXL_SHAPED, True)], ids=["sd15-shaped", "sdxl-shaped"])
def test_our_diffusers_export_loads_in_diffusers(tmp_path, kwargs, sdxl):
    ref = make(kwargs, seed=2)
    path = save(tmp_path / "src.safetensors", ref.state_dict())
    ours = load_control(path, diffusers_config=dict(ref.config))
    out = save_diffusers(ours, tmp_path / "exported", addition_time_embed_dim=8)
    cfg = json.loads((out / "config.json").read_text())
    back = diffusers.ControlNetModel.from_pretrained(out).eval()
    assert cfg["_class_name"] == "ControlNetModel"
    run_both(back, ours, sdxl)
