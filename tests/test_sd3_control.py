"""SD3 / SD3.5 ControlNets of the diffusers layout (InstantX canny / pose / tile, alimama inpainting): detection,
shapes -> config, parity with diffusers' `SD3ControlNetModel` and with ComfyUI's `comfy.cldm.mmdit.ControlNet` on the
same random weights read from real .safetensors files (fp32, rel. err <= 1e-5), and ComfyUI's rule for which base
block receives which control output."""
import pytest
import torch
from factories import randomize_, rel_err, save

from controlnet_core.checkpoint import open_checkpoint
from controlnet_core.errors import CheckpointError, ControlNetError
from controlnet_core.formats.sd3_keys import SIGNATURE, config_from_shapes, is_sd3_diffusers
from controlnet_core.mmdit import SD3ControlNet, SD3ControlNetConfig, append_keep_mask, base_block_sources, host_output_list

diffusers = pytest.importorskip("diffusers")
TOL = 1e-5
CONTEXT_DIM, POOLED_DIM, GRID = 96, 80, 24

# name -> (heads, blocks, extra SD3ControlNetModel arguments)
VARIANTS = {
    "plain": (2, 2, {}),  # InstantX canny / pose / tile: 16-channel hint
    "inpaint": (2, 2, dict(extra_conditioning_channels=1)),  # alimama: latent + keep mask
    "sd35": (2, 3, dict(qk_norm="rms_norm", dual_attention_layers=(0, 2))),  # SD3.5-medium-shaped blocks
}


def diffusers_sd3(heads: int, blocks: int, seed: int = 0, **extra):
    """A random-weight diffusers `SD3ControlNetModel` of 64-wide heads (the family's), at a tiny size."""
    model = diffusers.SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=blocks, attention_head_dim=64, num_attention_heads=heads,
        joint_attention_dim=CONTEXT_DIM, caption_projection_dim=64 * heads, pooled_projection_dim=POOLED_DIM,
        out_channels=16, pos_embed_max_size=GRID, **extra,
    )
    return randomize_(model, seed).eval()


def load_ours(path) -> SD3ControlNet:
    """Our model built from the file's shapes alone, filled strictly from its tensors."""
    src = open_checkpoint(path)
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    model = SD3ControlNet(cfg)
    model.load_state_dict({k: src.get(k) for k in src.keys()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    heads, blocks, extra = VARIANTS[request.param]
    ref = diffusers_sd3(heads, blocks, **extra)
    path = save(tmp_path_factory.mktemp("sd3") / f"sd3_{request.param}.safetensors", ref.state_dict())
    return request.param, ref, path


def sd3_inputs(cfg: SD3ControlNetConfig, batch: int, h: int = 8, w: int = 12, seed: int = 3, hint_batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    hint = torch.randn(hint_batch or batch, cfg.control_channels, h, w, generator=g)
    t = torch.tensor([999.0, 37.5, 500.0][:batch])
    ctx = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    y = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return x, hint, t, ctx, y


def diffusers_blocks(ref, x, hint, t, ctx, pooled):
    return ref(hidden_states=x, controlnet_cond=hint, conditioning_scale=1.0, encoder_hidden_states=ctx,
               pooled_projections=pooled, timestep=t, return_dict=False)[0]


def assert_close(ours, theirs):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"output {k}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert rel_err(a, b) <= TOL, f"output {k}: rel err {rel_err(a, b):.2e}"


# detection and config


def test_detected_and_sized_from_shapes(variant):
    name, ref, path = variant
    src = open_checkpoint(path)
    assert is_sd3_diffusers(src.keys())
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    heads, blocks, extra = VARIANTS[name]
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.patch_size) == (64 * heads, heads, blocks, 2)
    assert (cfg.in_channels, cfg.control_channels) == (16, 16 + extra.get("extra_conditioning_channels", 0))
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.pos_embed_max_size) == (CONTEXT_DIM, POOLED_DIM, GRID)
    assert cfg.qk_norm == extra.get("qk_norm") and cfg.dual_attention_layers == extra.get("dual_attention_layers", ())
    assert cfg.mlp_hidden_dim == 4 * cfg.hidden_size


def test_full_size_instantx_layout_maps_one_to_one():
    """SD3-medium width (1536 = 24 heads), 12 blocks, 192x192 positions: the same keys and shapes as diffusers'."""
    with torch.device("meta"):
        ref = diffusers.SD3ControlNetModel(num_layers=12, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        cfg = config_from_shapes(theirs)
        ours = {k: tuple(v.shape) for k, v in SD3ControlNet(cfg).state_dict().items()}
    assert ours == theirs
    assert (cfg.hidden_size, cfg.num_layers, cfg.base_depth, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (1536, 12, 24, 4096, 2048)


def test_not_detected_for_other_layouts(variant):
    _, ref, _ = variant
    keys = set(ref.state_dict())
    for k in SIGNATURE:
        assert not is_sd3_diffusers(keys - {k})
    flux_like = {"x_embedder.weight", "controlnet_x_embedder.weight", "context_embedder.weight", "controlnet_blocks.0.weight",
                 "transformer_blocks.0.attn.add_q_proj.weight"}
    assert not is_sd3_diffusers(flux_like)
    assert not is_sd3_diffusers({"controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight"})


def _shapes(variant_name="plain"):
    heads, blocks, extra = VARIANTS[variant_name]
    return {k: tuple(v.shape) for k, v in diffusers_sd3(heads, blocks, **extra).state_dict().items()}


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"pos_embed_input.proj.weight": (128, 16, 4, 4)}), "patches"),
    (lambda s: s.update({"pos_embed_input.proj.weight": (128, 8, 2, 2)}), "fewer than the latent"),
    (lambda s: s.update({"pos_embed.pos_embed": (1, 575, 128)}), "square grid"),
    (lambda s: s.update({"pos_embed.proj.weight": (96, 16, 2, 2)}), "multiple of the SD3 head width"),
    (lambda s: s.update({"context_embedder.weight": (64, 96)}), "context_embedder"),
    (lambda s: s.update({"transformer_blocks.1.norm1_context.linear.weight": (256, 128)}), "text stream"),
    (lambda s: s.update({"transformer_blocks.1.ff.net.0.proj.weight": (256, 128)}), "feed-forward"),
    (lambda s: s.pop("controlnet_blocks.1.weight") and s.pop("controlnet_blocks.1.bias"), "controlnet_blocks"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("transformer_blocks.0.")], "missing"),
    (lambda s: s.pop("time_text_embed.text_embedder.linear_1.weight"), "time_text_embed.text_embedder.linear_1.weight"),
], ids=["patch", "channels", "grid", "width", "context", "pre-only", "mlp", "outputs", "gap", "missing"])
def test_inconsistent_shapes_raise_checkpoint_error(edit, words):
    shapes = _shapes()
    edit(shapes)
    with pytest.raises(CheckpointError, match=words) as e:
        config_from_shapes(shapes)
    assert ".safetensors" not in str(e.value)  # the loader names the file


# parity


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_diffusers(variant, batch):
    _, ref, path = variant
    ours = load_ours(path)
    x, hint, t, ctx, y = sd3_inputs(ours.config, batch)
    with torch.no_grad():
        theirs = diffusers_blocks(ref, x, hint, t, ctx, torch.zeros_like(y))  # the pipelines' force_zeros_for_pooled_projection
        out = ours(x, hint, t, ctx, y)
        assert_close(out.blocks, theirs)
        assert out.blocks[0].shape == (batch, (8 // 2) * (12 // 2), ours.config.hidden_size)
        assert_close(ours(x, hint, t, ctx, y, zero_pooled=False).blocks, diffusers_blocks(ref, x, hint, t, ctx, y))


def test_bfloat16_follows_diffusers(variant):
    """Same operations in the same order: bf16 results equal diffusers' bf16 ones (the RMSNorm's float32 detour too)."""
    name, _, path = variant
    heads, blocks, extra = VARIANTS[name]
    ours = load_ours(path).to(torch.bfloat16)
    theirs = diffusers_sd3(heads, blocks, **extra).to(torch.bfloat16)  # a fresh copy: the fixture's stays fp32
    x, hint, t, ctx, y = (a.to(torch.bfloat16) if a.is_floating_point() and a.ndim > 1 else a for a in sd3_inputs(ours.config, 2))
    with torch.no_grad():
        out = ours(x, hint, t, ctx).blocks
        expected = diffusers_blocks(theirs, x, hint, t, ctx, torch.zeros_like(y))
    assert all(o.dtype == torch.bfloat16 for o in out)
    assert all(rel_err(a, b) <= 1e-3 for a, b in zip(out, expected))


def test_hint_of_batch_one_is_shared(variant):
    _, ref, path = variant
    ours = load_ours(path)
    x, hint, t, ctx, _ = sd3_inputs(ours.config, 2, hint_batch=1)
    with torch.no_grad():
        assert_close(ours(x, hint, t, ctx).blocks, ours(x, hint.expand(2, -1, -1, -1), t, ctx).blocks)


@pytest.fixture(scope="module")
def host_files(tmp_path_factory):
    """Files 256 wide (4 heads): ComfyUI reads the base depth as width / 64 = 4, so 2 blocks serve 3 base blocks."""
    d = tmp_path_factory.mktemp("sd3_host")
    out = {}
    for name, extra in [("plain", {}), ("inpaint", dict(extra_conditioning_channels=1)), ("sd35", dict(qk_norm="rms_norm", dual_attention_layers=(1,)))]:
        out[name] = save(d / f"sd3_{name}.safetensors", diffusers_sd3(4, 2, seed=5, **extra).state_dict())
    return out


@pytest.mark.parametrize("name", ["plain", "inpaint", "sd35"])
@pytest.mark.parametrize("size", [(8, 12), (7, 9)], ids=["even", "odd"])
def test_matches_comfy_sd3_controlnet(comfy, host_files, name, size):
    """Same file through ComfyUI's own loader: equal `control["output"]` lists (odd sizes padded as the host pads)."""
    import comfy.controlnet

    control = comfy.controlnet.load_controlnet(str(host_files[name]))
    assert type(control.control_model).__name__ == "ControlNet" and control.control_model.__module__ == "comfy.cldm.mmdit"
    assert control.latent_format.shift_factor == 0 and control.concat_mask == (name == "inpaint")
    ours = load_ours(host_files[name])
    x, hint, t, ctx, y = sd3_inputs(ours.config, 2, *size, hint_batch=1)
    with torch.no_grad():
        theirs = control.control_model.float()(x=x, timesteps=t, y=y, context=ctx, hint=hint)["output"]
        mine = ours(x, hint, t, ctx, y).host_output(ours.config.base_depth)
    assert len(mine) == 3
    assert_close(mine, theirs)


def test_base_model_gets_the_same_control(comfy, host_files):
    """ComfyUI's MMDiT (depth 4) with our outputs in `control["output"]` gives what it gives with ComfyUI's own."""
    import comfy.controlnet
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    ours = load_ours(host_files["plain"])
    cfg = ours.config
    base = OpenAISignatureMMDITWrapper(
        depth=cfg.base_depth, in_channels=16, out_channels=16, patch_size=2, adm_in_channels=POOLED_DIM, pos_embed_max_size=GRID,
        num_patches=GRID * GRID, context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": cfg.hidden_size}},
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
    )
    base = randomize_(base, seed=9).eval()
    with torch.no_grad():  # a buffer ComfyUI makes with torch.empty; randomize_ fills parameters only
        base.pos_embed.copy_(torch.randn(base.pos_embed.shape, generator=torch.Generator().manual_seed(10)) * 0.02)
    host = comfy.controlnet.load_controlnet(str(host_files["plain"])).control_model.float()
    x, hint, t, ctx, y = sd3_inputs(cfg, 2)
    with torch.no_grad():
        plain = base(x, t, context=ctx, y=y)
        theirs = base(x, t, context=ctx, y=y, control=host(x=x, timesteps=t, y=y, context=ctx, hint=hint))
        mine = base(x, t, context=ctx, y=y, control={"output": ours(x, hint, t, ctx).host_output(cfg.base_depth)})
    assert rel_err(mine, theirs) <= TOL
    assert rel_err(plain, theirs) > 1e-3  # the control did change the result


# the block rule


@pytest.mark.parametrize("blocks, depth", [(2, 4), (2, 6), (2, 24), (12, 24), (6, 24), (5, 24), (23, 24), (24, 24), (3, 38), (30, 24)])
def test_block_rule_is_comfys(comfy, blocks, depth):
    """Which control block feeds each base block, read off ComfyUI's own SD3 ControlNet forward at full depth.

    Built on the meta device with its joint blocks stubbed out: only its output loop is under test, and it never
    looks at the values."""
    import comfy.cldm.mmdit
    import comfy.ops

    class PassThrough(torch.nn.Module):
        def forward(self, context, x, **kwargs):
            return context, x

    net = comfy.cldm.mmdit.ControlNet(
        num_blocks=blocks, depth=depth, in_channels=16, patch_size=2, adm_in_channels=8,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 8, "out_features": 64 * depth}},
        dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init,
    )
    net.joint_blocks = torch.nn.ModuleList([PassThrough() for _ in net.joint_blocks])
    made = {}
    for i, layer in enumerate(net.controlnet_blocks):
        layer.register_forward_hook(lambda mod, args, out, i=i: made.__setitem__(id(out), i))
    meta = dict(device="meta")
    with torch.no_grad():
        output = net(x=torch.zeros(1, 16, 4, 4, **meta), timesteps=torch.zeros(1, **meta), y=torch.zeros(1, 8, **meta),
                     context=torch.zeros(1, 3, 8, **meta), hint=torch.zeros(1, 16, 4, 4, **meta))["output"]
    host_sources = [made[id(o)] for o in output]

    sources = base_block_sources(blocks, depth)
    assert len(sources) == depth
    assert [s for s in sources if s is not None] == host_sources
    assert all(s is None for s in sources[len(host_sources):])  # what is used is a prefix of the base blocks
    fake = [torch.full((1,), float(i)) for i in range(blocks)]
    assert [int(o) for o in host_output_list(fake, depth)] == host_sources


def test_block_rule_examples():
    assert base_block_sources(2, 4) == [0, 0, 1, None]
    assert base_block_sources(12, 24) == [k // 2 for k in range(23)] + [None]
    assert base_block_sources(5, 24) == [k // 4 for k in range(19)] + [None] * 5
    assert base_block_sources(30, 24) == [None] * 24


# inputs


def test_inpainting_hint_and_clear_input_errors(variant):
    name, _, path = variant
    ours = load_ours(path)
    x, hint, t, ctx, _ = sd3_inputs(ours.config, 2)
    latent = hint[:, :16]
    if name == "inpaint":
        with pytest.raises(ControlNetError, match="append_keep_mask"):
            ours(x, latent, t, ctx)
        full = append_keep_mask(latent)
        assert full.shape == (2, 17, 8, 12) and bool((full[:, 16] == 1).all())
        keep = (torch.rand(1, 1, 8, 12) > 0.5).float()
        assert torch.equal(append_keep_mask(latent, keep)[1, 16], keep[0, 0])
        with pytest.raises(ControlNetError, match="keep mask"):
            append_keep_mask(latent, keep[..., :4])
    with pytest.raises(ControlNetError, match="latent's size"):
        ours(x, hint[..., :4], t, ctx)
    with pytest.raises(ControlNetError, match="context"):
        ours(x, hint, t, ctx[..., :8])
    with pytest.raises(ControlNetError, match="positional grid"):
        big = torch.zeros(1, ours.config.in_channels, 2 * GRID + 2, 8)
        ours(big, torch.zeros(1, ours.config.control_channels, 2 * GRID + 2, 8), torch.tensor([1.0]), ctx[:1])
