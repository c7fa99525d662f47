"""SDXL union ControlNets (xinsir ControlNet++ / ProMax): detection, and parity with diffusers' `ControlNetUnionModel`
and with ComfyUI's own union code, on the same random weights (fp32)."""
from pathlib import Path

import pytest
import torch
from factories import comfy_cldm, inputs, random_controlnet, randomize_, rel_err, save

from controlnet_core import ControlNetConfig, ControlNetError, load_control
from controlnet_core.layers import timestep_embedding
from controlnet_core.union import UNION_TYPES

diffusers = pytest.importorskip("diffusers")
TOL = 1e-5

UNION_SHAPED = dict(
    block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=2,
    cross_attention_dim=64, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=32, conditioning_embedding_out_channels=(16, 32, 96, 256), num_trans_channel=64, num_proj_channel=64,
)


def make(num_types=6, seed=0):
    model = diffusers.ControlNetUnionModel(**UNION_SHAPED, num_control_type=num_types)
    return randomize_(model, seed).eval()


@pytest.fixture(scope="module")
def promax(tmp_path_factory):
    ref = make(8)
    path = save(tmp_path_factory.mktemp("union") / "union_promax.safetensors", ref.state_dict())
    return ref, load_control(path)


def _inputs(batch, seed=7, latent=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.tensor([999.0, 37.0, 500.0][:batch])
    ctx = torch.randn(batch, 5, 64, generator=g)
    text = torch.randn(batch, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
    y = torch.cat([text, timestep_embedding(time_ids.flatten(), 8).reshape(batch, -1)], dim=1)
    hints = [torch.rand(1, 3, latent * 8, latent * 8, generator=g) for _ in range(3)]
    return x, t, ctx, {"text_embeds": text, "time_ids": time_ids}, y, hints


def _reference(ref, x, t, ctx, added, hints, types, scales, num_types):
    flags = torch.zeros(x.shape[0], num_types)
    flags[:, types] = 1.0
    with torch.no_grad():
        return ref(x, t, encoder_hidden_states=ctx, controlnet_cond=[h.expand(x.shape[0], -1, -1, -1) for h in hints],
                   control_type=flags, control_type_idx=list(types), conditioning_scale=scales, added_cond_kwargs=added, return_dict=False)


def _close(res, down, mid):
    assert len(res.down) == len(down)
    for k, (a, b) in enumerate(zip(res.down, down)):
        assert rel_err(a, b) <= TOL, f"down[{k}] rel err {rel_err(a, b):.2e}"
    assert rel_err(res.mid, mid) <= TOL


def test_a_union_file_is_detected_with_its_types_and_layers(promax):
    _, ours = promax
    cfg = ours.config
    assert ours.format == "diffusers" and (cfg.union_types, cfg.union_layers, cfg.union_type_dim) == (8, 1, 8)
    assert "union with 8 control types" in cfg.family()
    assert set(k for k in ours.model.state_dict() if k.startswith(("task_", "transformer_layes", "spatial", "control_add"))) >= {
        "task_embedding", "transformer_layes.0.attn.in_proj_weight", "spatial_ch_projs.weight", "control_add_embedding.linear_1.weight"}


@pytest.mark.parametrize("types, scales", [([3], [1.0]), ([3], [0.6]), ([0, 1], [1.0, 1.0]), ([0, 1, 5], [0.7, 1.2, 0.4])],
                         ids=["canny", "canny-weight", "pose+depth", "three-weighted"])
@pytest.mark.parametrize("batch", [1, 2])
def test_one_or_several_conditions_match_diffusers(promax, types, scales, batch):
    """batch 2 holds one image twice (as classifier-free guidance does): where diffusers' batch-axis attention and ours agree."""
    ref, ours = promax
    x, t, ctx, added, y, hints = _inputs(batch)
    hints = hints[: len(types)]
    down, mid = _reference(ref, x, t, ctx, added, hints, types, scales, 8)
    with torch.no_grad():
        res = ours.model(x, hints, t, ctx, y, control_types=types, condition_weights=scales)
    _close(res, down, mid)


def test_results_do_not_depend_on_the_rest_of_the_batch(promax):
    """Per image, the same as that image alone, whatever else the batch holds (the sampler batches freely)."""
    _, ours = promax
    x, t, ctx, _, y, hints = _inputs(2)
    pair = [torch.cat([hints[0], hints[1]]), torch.cat([hints[2], hints[0]])]
    with torch.no_grad():
        both = ours.model(x, pair, t, ctx, y, control_types=[0, 3])
        for i in range(2):
            alone = ours.model(x[i:i + 1], [h[i:i + 1] for h in pair], t[i:i + 1], ctx[i:i + 1], y[i:i + 1], control_types=[0, 3])
            for a, b in zip(alone.tensors(), both.tensors()):
                assert rel_err(a, b[i:i + 1]) <= TOL


def test_types_outside_the_file_and_mismatched_counts_are_clear_errors(tmp_path):
    ref = make(6, seed=1)
    ours = load_control(save(tmp_path / "union_v1.safetensors", ref.state_dict()))
    x, t, ctx, _, y, hints = _inputs(1)
    with pytest.raises(ControlNetError, match=r"control type tile \(6\) is not one of the 6 types.*ProMax"):
        ours.model(x, hints[:1], t, ctx, y, control_types=[UNION_TYPES["tile"]])
    with pytest.raises(ControlNetError, match=r"2 condition image\(s\) for 1 control type"):
        ours.model(x, hints[:2], t, ctx, y, control_types=[0])
    with pytest.raises(ControlNetError, match="without control types"):
        ours.model(x, hints[:2], t, ctx, y)


UNION_320 = ControlNetConfig(  # ComfyUI's union code fixes the width at 320 and the type embedding at 256
    model_channels=320, channel_mult=(1,), num_res_blocks=(1,), transformer_depth=(1,), transformer_depth_middle=1, context_dim=64,
    use_linear_in_transformer=True, num_heads=-1, num_head_channels=64, adm_in_channels=96, union_types=8, union_type_dim=256,
)


@pytest.mark.parametrize("types", [[], [3], [6]], ids=["no-type", "canny", "tile"])
def test_single_type_and_no_type_match_comfyui_core(comfy, types):
    """ComfyUI's own union code (SetUnionControlNetType sets one type; none runs the plain path with a zero type vector)."""
    ours = random_controlnet(UNION_320, seed=3)
    theirs = comfy_cldm(UNION_320, union_controlnet_num_control_type=8)
    theirs.load_state_dict({k.replace(".attn.in_proj_", ".attn.in_proj."): v for k, v in ours.state_dict().items()})
    x, hint, t, ctx, y = inputs(UNION_320, batch=2, latent=8)
    with torch.no_grad():
        res = ours(x, hint, t, ctx, y, control_types=types)
        out = theirs(x, hint, t, ctx, y, control_type=list(types))
    _close(res, list(out["output"]), out["middle"][0])


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_a_union_file_round_trips_in_both_layouts(tmp_path, promax, layout):
    from controlnet_core import save_diffusers, save_ldm

    ref, ours = promax
    x, t, ctx, added, y, hints = _inputs(1)
    if layout == "ldm":
        again = load_control(save_ldm(ours, tmp_path / "union_ldm.safetensors"))
    else:
        folder = save_diffusers(ours, tmp_path / "union_diffusers", addition_time_embed_dim=8)
        again = load_control(folder / "diffusion_pytorch_model.safetensors")
        theirs = diffusers.ControlNetUnionModel.from_pretrained(folder).eval()
        down, mid = _reference(theirs, x, t, ctx, added, hints[:2], [0, 1], [1.0, 0.5], 8)
        with torch.no_grad():
            _close(ours.model(x, hints[:2], t, ctx, y, control_types=[0, 1], condition_weights=[1.0, 0.5]), down, mid)
    assert again.config == ours.config
    for k, v in ours.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k


def test_full_size_promax_matches_comfyui_builtin_loader_once(comfy):
    """ComfyUI's loader detects a diffusers union file only at full SDXL size: random weights, one forward at 128 px.

    The state dict is handed over in memory, in the published diffusers layout (no 5 GB file written)."""
    import comfy.controlnet
    from factories import SDXL, comfy_control_outputs

    from controlnet_core.formats import diffusers as diffusers_fmt

    cfg = ControlNetConfig(**{**SDXL.__dict__, "union_types": 8})
    ours_model = random_controlnet(cfg, seed=21)
    names = diffusers_fmt.from_canonical_map(cfg, ours_model.state_dict().keys())
    published = {names[k]: v for k, v in ours_model.state_dict().items()}
    # the published 6-type file's keys and shapes (tests/data/keys), with 8 types where the type count shows
    rows = [line.split("\t") for line in (Path(__file__).parent / "data/keys/keys_diffusers_union_sdxl.tsv").read_text().splitlines() if line]
    real = {k: tuple(int(d) for d in shape.strip("()").split(",") if d.strip()) for k, shape in rows}
    real.update({"task_embedding": (8, 320), "control_add_embedding.linear_1.weight": (1280, 8 * 256)})
    assert {k: tuple(v.shape) for k, v in published.items()} == real
    ours = load_control(dict(published))
    del ours_model
    theirs = comfy.controlnet.load_controlnet_state_dict(dict(published))
    assert theirs is not None and theirs.control_model.task_embedding.shape == (8, 320)
    net = theirs.control_model.float()
    del published
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 16, 16, generator=g)
    hint = torch.rand(1, 3, 128, 128, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, 2048, generator=g)
    y = torch.randn(1, 2816, generator=g)
    with torch.no_grad():
        for types in ([], [1]):
            res = ours.residuals(x, hint, t, ctx, y, control_types=types)
            out = net(x, hint, t, ctx, y, control_type=types)
            down, mid = (list(out["output"]), out["middle"][0]) if isinstance(out, dict) else comfy_control_outputs(net, x, hint, t, ctx, y)
            _close(res, down, mid)
