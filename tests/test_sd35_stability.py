"""Stability's SD3.5 ControlNets (blur / canny / depth, release layout): detection, shapes -> config, the embedder
adopted from the base model, and parity with ComfyUI's own `ControlNetEmbedder` on the same random weights read from
real .safetensors files (fp32, rel. err <= 1e-5), including the output repeat rule and odd latent sizes."""
import pytest
import torch
from factories import randomize_, rel_err, save

from controlnet_core import load_control
from controlnet_core.errors import CheckpointError, ControlNetError
from controlnet_core.formats import detect_format
from controlnet_core.mmdit.sd35_stability import SD35ControlNet, SD35ControlNetConfig, hint_latent_from_vae, host_output_list, prepare_pixels

TOL = 1e-5
WIDTH, BLOCKS = 256, 2  # ComfyUI reads the base depth as width / 64 = 4: each output serves 2 base blocks
DIFFUSERS_NAMES = {"t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
                   "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2."}


def release_file(path, *, control_type=1, double_y=False, diffusers_names=False, seed=0):
    """A random-weight file laid out like Stability's: no patch embedding (unless double-y), a control_type scalar."""
    cfg = SD35ControlNetConfig(hidden_size=WIDTH, num_layers=BLOCKS, mlp_hidden_dim=4 * WIDTH, double_y_emb=double_y)
    sd = randomize_(SD35ControlNet(cfg), seed).state_dict()
    drop = "orig_y_embedder." if double_y else "x_embedder."
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    if diffusers_names:
        sd = {next((new + k[len(old):] for old, new in DIFFUSERS_NAMES.items() if k.startswith(old)), k): v for k, v in sd.items()}
    if control_type is not None:
        sd["control_type"] = torch.tensor([float(control_type)])
    return save(path, sd)


def base_embedders(seed=7):
    """The base SD3.5 transformer's x_embedder and y_embedder, in ComfyUI's (reference) names."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    return {"x_embedder.proj.weight": r(WIDTH, 16, 2, 2), "x_embedder.proj.bias": r(WIDTH),
            "y_embedder.mlp.0.weight": r(WIDTH, 2048), "y_embedder.mlp.0.bias": r(WIDTH),
            "y_embedder.mlp.2.weight": r(WIDTH, WIDTH), "y_embedder.mlp.2.bias": r(WIDTH)}


VARIANTS = {"canny": dict(control_type=1), "depth-diffusers-names": dict(control_type=2, diffusers_names=True),
            "blur-double-y": dict(control_type=0, double_y=True), "untyped": dict(control_type=None)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd35")
    return {name: release_file(d / f"sd35_{name}.safetensors", seed=i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}


def inputs(batch=2, h=8, w=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, h, w, generator=g), torch.randn(1, 16, h, w, generator=g), torch.tensor([999.0, 250.0][:batch]),
            torch.randn(batch, 2048, generator=g))


def test_detected_and_sized_from_shapes(files):
    for name, path in files.items():
        lc = load_control(path)
        assert lc.format == "sd35-stability" and lc.kind == "sd35_controlnet" and lc.takes_latent_hint
        cfg = lc.config
        assert (cfg.hidden_size, cfg.num_layers, cfg.base_depth, cfg.mlp_hidden_dim) == (WIDTH, BLOCKS, 4, 4 * WIDTH)
        assert cfg.double_y_emb == VARIANTS[name].get("double_y", False)
        assert cfg.control_type == VARIANTS[name]["control_type"]


def test_not_taken_for_the_diffusers_sd3_layout(files):
    from controlnet_core.mmdit import SD3ControlNet, SD3ControlNetConfig

    with torch.device("meta"):
        keys = SD3ControlNet(SD3ControlNetConfig(hidden_size=128, num_layers=1)).state_dict().keys()
    assert detect_format(keys) == "sd3-diffusers"


def test_sampling_before_adopting_the_base_embedder_is_refused(files):
    lc = load_control(files["canny"])
    with pytest.raises(ControlNetError, match="adopt"):
        lc.model(*inputs())
    bad = dict(base_embedders())
    bad["x_embedder.proj.weight"] = bad["x_embedder.proj.weight"][:, :, :1]
    with pytest.raises(ControlNetError, match="does not fit"):
        lc.model.adopt_base_embedders(bad)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("size", [(8, 12), (7, 9)], ids=["even", "odd"])
def test_matches_comfy_sd35_controlnet(comfy, files, name, size):
    import comfy.controlnet

    host = comfy.controlnet.load_controlnet(str(files[name]))
    assert type(host).__name__ == "ControlNetSD35"
    cm = host.control_model.float()
    base = base_embedders()
    if cm.double_y_emb:
        cm.orig_y_embedder.load_state_dict({k[len("y_embedder."):]: v for k, v in base.items() if k.startswith("y_embedder.")})
    else:
        cm.x_embedder.load_state_dict({k[len("x_embedder."):]: v for k, v in base.items() if k.startswith("x_embedder.")})
    lc = load_control(files[name])
    lc.model.adopt_base_embedders(base)
    x, hint, t, y = inputs(2, *size)
    with torch.no_grad():
        theirs = cm(x=x, timesteps=t, y=y, hint=hint)["output"]
        mine = host_output_list(lc.model(x, hint, t, y), lc.config.base_depth)
    assert len(mine) == len(theirs) == 4 and mine[0] is mine[1]
    for k, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape and rel_err(a, b) <= TOL, f"output {k}: rel err {rel_err(a, b):.2e}"
    image = torch.rand(1, 3, 16, 16)
    assert torch.equal(prepare_pixels(image, lc.config.control_type), host.preprocess_image(image))


def test_hint_latent_keeps_the_vae_shift(comfy):
    import comfy.latent_formats

    latent = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(hint_latent_from_vae(latent), comfy.latent_formats.SD3().process_in(latent), rtol=0, atol=1e-7)


def test_broken_files_are_checkpoint_errors(tmp_path):
    path = release_file(tmp_path / "ok.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    cases = {
        "missing block": {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.1.")},
        "bad control type": {**sd, "control_type": torch.tensor([7.0])},
        "wide qkv": {**sd, "transformer_blocks.0.attn.qkv.weight": torch.zeros(3 * WIDTH + 1, WIDTH)},
        "two names": {**sd, "time_text_embed.timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"].clone()},
    }
    for case, broken in cases.items():
        p = save(tmp_path / f"{case.replace(' ', '_')}.safetensors", broken)
        with pytest.raises(CheckpointError) as e:
            load_control(p)
        assert p.name in str(e.value), case


def _diffusers_names(sd: dict) -> dict:
    """Our (the release files') names -> diffusers' `SD3ControlNetModel` names for its SD3.5 8b variant (no `pos_embed`,
    no `context_embedder`, `SD3SingleTransformerBlock`s); the fused qkv is split into to_q / to_k / to_v."""
    plain = {"t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
             "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
             ".adaLN_modulation.1.": ".norm1.linear.", ".attn.proj.": ".attn.to_out.0.", ".mlp.fc1.": ".ff.net.0.proj.", ".mlp.fc2.": ".ff.net.2."}
    out = {}
    for k, v in sd.items():
        if k.startswith("x_embedder."):
            continue  # diffusers takes the tokens already embedded by the base transformer
        if ".attn.qkv." in k:
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[k.replace(".attn.qkv.", f".attn.{name}.")] = part
            continue
        for ours, theirs in plain.items():
            k = k.replace(ours, theirs) if ours.startswith(".") or k.startswith(ours) else k
        out[k] = v
    return out


def test_matches_diffusers_sd35_8b_controlnet(files):
    """diffusers runs these files (converted) as `SD3ControlNetModel(use_pos_embed=False, joint_attention_dim=None)`
    on tokens the base transformer embedded; fed the same tokens, its outputs equal ours."""
    diffusers = pytest.importorskip("diffusers")
    from controlnet_core.mmdit.sd35_stability import sincos_positions

    lc = load_control(files["canny"])
    lc.model.adopt_base_embedders(base_embedders())
    ref = diffusers.SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=16, num_layers=BLOCKS, attention_head_dim=64,
                                       num_attention_heads=WIDTH // 64, joint_attention_dim=None, caption_projection_dim=WIDTH,
                                       pooled_projection_dim=2048, out_channels=16, use_pos_embed=False,
                                       force_zeros_for_pooled_projection=False).eval()
    ref.load_state_dict(_diffusers_names(lc.model.state_dict()), strict=True)
    x, hint, t, y = inputs(2, 8, 12)
    with torch.no_grad():
        tokens = lc.model.x_embedder(x) + sincos_positions(WIDTH, 4, 6)
        theirs = ref(hidden_states=tokens, controlnet_cond=hint.expand(2, -1, -1, -1), conditioning_scale=1.0, encoder_hidden_states=None,
                     pooled_projections=y, timestep=t, return_dict=False)[0]
        mine = lc.model(x, hint, t, y)
    assert len(mine) == len(theirs) == BLOCKS
    for k, (a, b) in enumerate(zip(mine, theirs)):
        assert rel_err(a, b) <= TOL, f"output {k}: rel err {rel_err(a, b):.2e}"
