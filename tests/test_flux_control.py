"""Flux ControlNets (InstantX / Shakker / alimama layout, XLabs, MistoLine): detection, shapes -> config, parity with
diffusers' `FluxControlNetModel` and with ComfyUI's `comfy.ldm.flux.controlnet.ControlNetFlux` on the same random
weights read from real .safetensors files (fp32, rel. err <= 1e-5), and ComfyUI's rule for which base block receives
which control output, read off ComfyUI's own ControlNet and Flux base with stubbed blocks (and diffusers' for
comparison).

Tiny sizes: 2 heads of 64 (Flux.1's rotary split scaled to 64: (8, 28, 28)), 2 double / 2 single blocks."""
import math

import pytest
import torch
from factories import SD15_TINY, random_controlnet, randomize_, rel_err, save

from controlnet_core.checkpoint import open_checkpoint
from controlnet_core.errors import CheckpointError, ControlNetError
from controlnet_core.flux import (
    COMFY_DOUBLE_SLOTS,
    COMFY_SINGLE_SLOTS,
    FluxControlNetConfig,
    FluxControlOutput,
    FluxInstantXControlNet,
    FluxXLabsControlNet,
    append_keep_mask,
    build_flux_controlnet,
    diffusers_block_sources,
    flux_base_sources,
    hint_latent_from_vae,
    host_sources,
)
from controlnet_core.flux.layers import pack, position_ids
from controlnet_core.formats.flux_keys import (
    SIGNATURE_INSTANTX,
    SIGNATURE_MISTOLINE,
    SIGNATURE_XLABS,
    config_from_shapes,
    flux_layout,
    is_flux_instantx,
    is_flux_mistoline,
    is_flux_xlabs,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")  # raised inside diffusers' own Flux classes
TOL = 1e-5
HEADS, HEAD_DIM, AXES = 2, 64, [8, 28, 28]
WIDTH = HEADS * HEAD_DIM
CONTEXT_DIM, POOLED_DIM = 96, 80

# name -> (double blocks, single blocks, guidance, extra FluxControlNetModel arguments); "inpaint" swaps in a 68-wide
# hint projection (diffusers' class has no argument for it; alimama's files are this shape)
INSTANTX = {
    "plain": (2, 2, False, {}),  # InstantX canny / depth, schnell-like (no guidance embedding)
    "union": (2, 2, True, dict(num_mode=4)),  # InstantX / Shakker union: mode token before the text
    "pro2": (2, 0, True, {}),  # Shakker Union Pro 2.0 shape: no mode embedding, no single blocks
    "inpaint": (2, 2, True, {}),  # alimama inpainting: 64 latent + 4 packed keep-mask features
    "pixel": (2, 0, True, dict(conditioning_embedding_channels=16, patch_size=2)),  # diffusers' conversion of XLabs
}


def diffusers_flux(name: str, seed: int = 0):
    """A random-weight diffusers `FluxControlNetModel` of the variant, at a tiny size."""
    double, single, guidance, extra = INSTANTX[name]
    model = diffusers.FluxControlNetModel(
        in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=CONTEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance, axes_dims_rope=AXES, **extra)
    if name == "inpaint":
        model.controlnet_x_embedder = torch.nn.Linear(68, WIDTH)
    return randomize_(model, seed).eval()


def load_ours(path, dtype=None):
    """Our model built from the file's shapes alone, filled strictly from its tensors."""
    src = open_checkpoint(path)
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    model = build_flux_controlnet(cfg, dtype=dtype)
    model.load_state_dict({k: src.get(k) for k in src.keys()}, strict=True)
    return model.eval()


def flux_inputs(cfg: FluxControlNetConfig, batch: int, h: int = 8, w: int = 12, seed: int = 3, hint_batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, h, w, generator=g)
    if cfg.pixel_hint:
        hint = torch.rand(hint_batch or batch, 3, 8 * h, 8 * w, generator=g)
    else:
        hint = torch.randn(hint_batch or batch, cfg.hint_latent_channels, h, w, generator=g)
    t = torch.tensor([0.95, 0.3, 0.6][:batch])
    ctx = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    y = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    guidance = torch.tensor([3.5, 2.0, 4.0][:batch])
    return x, hint, t, ctx, y, guidance


def diffusers_outputs(ref, cfg, x, hint, t, ctx, y, guidance, mode=None):
    """diffusers takes packed tokens, 2-D position ids, the image hint on -1..1 and a (B, 1) mode."""
    rows, cols = math.ceil(x.shape[2] / 2), math.ceil(x.shape[3] / 2)
    cond = hint * 2 - 1 if cfg.pixel_hint else pack(hint.expand(x.shape[0], -1, -1, -1))
    double, single = ref(
        hidden_states=pack(x), controlnet_cond=cond.expand(x.shape[0], *cond.shape[1:]), encoder_hidden_states=ctx,
        pooled_projections=y, timestep=t, img_ids=position_ids(0, rows, cols), txt_ids=torch.zeros(ctx.shape[1], 3),
        guidance=guidance if cfg.guidance_embeds else None, controlnet_mode=None if mode is None else mode[:, None],
        return_dict=False)
    return tuple(double or ()), tuple(single or ())


def assert_close(ours, theirs, tol=TOL):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"output {k}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert rel_err(a, b) <= tol, f"output {k}: rel err {rel_err(a, b):.2e}"


@pytest.fixture(scope="module")
def instantx_files(tmp_path_factory):
    """name -> (the diffusers model, the .safetensors file of its weights), for every variant."""
    d = tmp_path_factory.mktemp("flux")
    out = {}
    for name in INSTANTX:
        ref = diffusers_flux(name)
        out[name] = ref, save(d / f"flux_{name}.safetensors", ref.state_dict())
    return out


@pytest.fixture(params=list(INSTANTX))
def instantx(request, instantx_files):
    return (request.param, *instantx_files[request.param])


# detection and config


def test_instantx_detected_and_sized_from_shapes(instantx):
    name, ref, path = instantx
    src = open_checkpoint(path)
    assert is_flux_instantx(src.keys()) and flux_layout(src.keys()) == "instantx"
    assert not is_flux_xlabs(src.keys()) and not is_flux_mistoline(src.keys())
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    double, single, guidance, extra = INSTANTX[name]
    assert (cfg.layout, cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.axes_dims_rope) == ("instantx", WIDTH, HEAD_DIM, HEADS, tuple(AXES))
    assert (cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds, cfg.num_modes) == (double, single, guidance, extra.get("num_mode", 0))
    assert (cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.mlp_hidden_dim) == (64, CONTEXT_DIM, POOLED_DIM, 4 * WIDTH)
    assert cfg.hint_channels == (68 if name == "inpaint" else 64)
    assert (cfg.hint_latent_channels, cfg.extra_conditioning_channels) == {"inpaint": (17, 1), "pixel": (0, 0)}.get(name, (16, 0))
    assert cfg.pixel_hint == (name == "pixel") and cfg.hint_encoder_channels == (16 if name == "pixel" else 0)


@pytest.mark.parametrize("config", [
    {},  # diffusers' defaults: 19 double + 38 single blocks of width 3072, no guidance
    dict(num_layers=5, num_single_layers=10, num_mode=10),  # InstantX / Shakker union (Pro)
    dict(num_layers=6, num_single_layers=0, guidance_embeds=True),  # Shakker Union Pro 2.0 (its published config.json)
], ids=["default", "union", "union-pro-2"])
def test_full_size_instantx_layout_maps_one_to_one(config):
    """Full Flux.1 width on the meta device: the same keys and shapes as diffusers' FluxControlNetModel."""
    with torch.device("meta"):
        ref = diffusers.FluxControlNetModel(**config)
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        cfg = config_from_shapes(theirs)
        ours = {k: tuple(v.shape) for k, v in FluxInstantXControlNet(cfg).state_dict().items()}
    assert ours == theirs
    assert (cfg.hidden_size, cfg.head_dim, cfg.axes_dims_rope, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (3072, 128, (16, 56, 56), 4096, 768)
    assert cfg.num_modes == config.get("num_mode", 0) and cfg.guidance_embeds == config.get("guidance_embeds", False)


def comfy_params(double: int, single: int, guidance: bool, width: int = WIDTH, heads: int = HEADS, axes=AXES) -> dict:
    """ComfyUI FluxParams for a ControlNet of our tiny (or the full) shape."""
    import dataclasses

    import comfy.ldm.flux.model

    out = dict(in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM, context_in_dim=CONTEXT_DIM, hidden_size=width, mlp_ratio=4.0,
               num_heads=heads, depth=double, depth_single_blocks=single, axes_dim=list(axes), theta=10000, patch_size=2,
               qkv_bias=True, guidance_embed=guidance)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        out["txt_ids_dims"] = []  # ComfyUI 0.8.0 and later: what its detection sets for Flux.1
    return out


def comfy_bfl_controlnet(comfy, mistoline: bool, double: int, single: int, seed: int = 0, device=None, **params):
    """ComfyUI's own XLabs / MistoLine ControlNet class, random weights unless on the meta device."""
    import comfy.ldm.flux.controlnet
    import comfy.ops

    model = comfy.ldm.flux.controlnet.ControlNetFlux(
        mistoline=mistoline, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=device,
        **{**comfy_params(double, single, True), **params})
    return model if device == "meta" else randomize_(model, seed).eval()


def bfl_file_state(model, mistoline: bool) -> dict:
    """ComfyUI's class state dict under the file's key names: MistoLine files say `single_controlnet_blocks`, which
    ComfyUI's loader renames (`convert_mistoline`)."""
    sd = model.state_dict()
    if mistoline:
        sd = {k.replace("controlnet_single_blocks.", "single_controlnet_blocks.", 1): v for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("mistoline", [False, True], ids=["xlabs", "mistoline"])
def test_full_size_bfl_layouts_map_one_to_one(comfy, mistoline):
    """Flux.1 width on the meta device: ComfyUI's XLabs / MistoLine class and ours have the same keys and shapes."""
    single = 2 if mistoline else 0
    theirs = comfy_bfl_controlnet(comfy, mistoline, 2, single, device="meta", vec_in_dim=768, context_in_dim=4096,
                                  hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56])
    theirs = {k: tuple(v.shape) for k, v in bfl_file_state(theirs, mistoline).items()}
    cfg = config_from_shapes(theirs)
    assert cfg.layout == ("mistoline" if mistoline else "xlabs")
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds) == (3072, 24, 2, single, True)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in FluxXLabsControlNet(cfg).state_dict().items()}
    assert ours == theirs


def test_not_detected_for_other_layouts(comfy):
    import comfy.ldm.flux.model
    import comfy.ops

    flux_ctl = set(diffusers_flux("union").state_dict())
    with torch.device("meta"):
        sd3 = set(diffusers.SD3ControlNetModel(num_layers=2, num_attention_heads=2, caption_projection_dim=128, sample_size=16,
                                               pos_embed_max_size=16).state_dict())
        flux_base = set(diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1).state_dict())
        unet_cn = set(diffusers.ControlNetModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                                cross_attention_dim=32, norm_num_groups=8).state_dict())
        qwen = set(diffusers.QwenImageControlNetModel(num_layers=1, attention_head_dim=64, num_attention_heads=2,
                                                      joint_attention_dim=32, axes_dims_rope=(8, 28, 28)).state_dict())
        comfy_base = set(comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, device="meta",
                                                   **comfy_params(1, 1, True)).state_dict())
    ldm_cn = set(random_controlnet(SD15_TINY).state_dict())
    for keys in (sd3, flux_base, unet_cn, qwen, comfy_base, ldm_cn):
        assert flux_layout(keys) is None
    for signature, test in ((SIGNATURE_INSTANTX, is_flux_instantx), (SIGNATURE_XLABS, is_flux_xlabs), (SIGNATURE_MISTOLINE, is_flux_mistoline)):
        assert test(signature)
        for k in signature:
            assert not test(set(signature) - {k})
    from controlnet_core.formats.sd3_keys import is_sd3_diffusers

    assert not is_sd3_diffusers(flux_ctl)
    with pytest.raises(CheckpointError, match="not those of a Flux ControlNet"):
        config_from_shapes({k: (1,) for k in sd3})


def _instantx_shapes(name="union"):
    return {k: tuple(v.shape) for k, v in diffusers_flux(name).state_dict().items()}


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"controlnet_x_embedder.weight": (128, 66)}), "whole 2x2 packed pixels"),
    (lambda s: s.update({"controlnet_x_embedder.weight": (128, 32)}), "controlnet_x_embedder"),
    (lambda s: s.update({"context_embedder.weight": (64, 96)}), "context_embedder"),
    (lambda s: s.update({"transformer_blocks.0.attn.norm_q.weight": (16,)}), "rotary split"),
    (lambda s: s.update({"transformer_blocks.1.attn.norm_added_k.weight": (32,)}), "norm_added_k"),
    (lambda s: s.update({"transformer_blocks.1.ff_context.net.0.proj.weight": (256, 128)}), "feed-forward width"),
    (lambda s: s.update({"single_transformer_blocks.1.proj_out.weight": (128, 128)}), "side by side"),
    (lambda s: s.update({"controlnet_mode_embedder.weight": (4, 64)}), "mode token"),
    (lambda s: s.pop("controlnet_single_blocks.1.weight") and s.pop("controlnet_single_blocks.1.bias"), "controlnet_single_blocks"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("single_transformer_blocks.0.")], "missing"),
    (lambda s: s.pop("time_text_embed.text_embedder.linear_1.weight"), "time_text_embed.text_embedder.linear_1.weight"),
], ids=["packing", "channels", "context", "head", "norm", "mlp", "single-out", "modes", "outputs", "gap", "missing"])
def test_inconsistent_instantx_shapes_raise_checkpoint_error(edit, words):
    shapes = _instantx_shapes()
    edit(shapes)
    with pytest.raises(CheckpointError, match=words) as e:
        config_from_shapes(shapes)
    assert ".safetensors" not in str(e.value)  # the loader names the file


@pytest.mark.parametrize("mistoline, edit, words", [
    (False, lambda s: s.update({"input_hint_block.4.weight": (16, 16, 1, 1)}), "convolution 3"),
    (False, lambda s: s.update({"pos_embed_input.weight": (128, 68)}), "packed 2x2"),
    (False, lambda s: s.update({"single_blocks.0.linear1.weight": (896, 128)}), "double blocks only"),
    (False, lambda s: s.update({"double_blocks.1.txt_attn.qkv.weight": (256, 128)}), "queries, keys and values"),
    (True, lambda s: s.update({"input_cond_block.encoder.20.weight": (16, 16, 3, 3)}), "more than its 10"),
    (True, lambda s: s.pop("single_controlnet_blocks.1.linear.weight") and s.pop("single_controlnet_blocks.1.linear.bias"), "single_controlnet_blocks"),
    (True, lambda s: s.update({"single_blocks.0.norm.key_norm.scale": (32,)}), "key_norm"),
], ids=["xlabs-encoder", "xlabs-hint", "xlabs-single", "xlabs-qkv", "misto-encoder", "misto-outputs", "misto-norm"])
def test_inconsistent_bfl_shapes_raise_checkpoint_error(comfy, mistoline, edit, words):
    model = comfy_bfl_controlnet(comfy, mistoline, 2, 2 if mistoline else 0, device="meta")
    shapes = {k: tuple(v.shape) for k, v in bfl_file_state(model, mistoline).items()}
    edit(shapes)
    with pytest.raises(CheckpointError, match=words):
        config_from_shapes(shapes)


def test_config_refuses_impossible_numbers():
    with pytest.raises(ControlNetError, match="multiple of head_dim"):
        FluxControlNetConfig(hidden_size=100, head_dim=64)
    with pytest.raises(ControlNetError, match="axes_dims_rope"):
        FluxControlNetConfig(hidden_size=128, head_dim=64, axes_dims_rope=(8, 28, 30))
    with pytest.raises(ControlNetError, match="double blocks only"):
        FluxControlNetConfig(layout="xlabs", num_single_layers=2)
    with pytest.raises(ControlNetError, match="FluxXLabsControlNet"):
        FluxInstantXControlNet(FluxControlNetConfig(layout="mistoline", hidden_size=128, head_dim=64, num_layers=1, num_single_layers=0))


# parity with diffusers


@pytest.mark.parametrize("batch", [1, 2])
def test_instantx_matches_diffusers(instantx, batch):
    name, ref, path = instantx
    ours = load_ours(path)
    cfg = ours.config
    x, hint, t, ctx, y, guidance = flux_inputs(cfg, batch)
    mode = torch.tensor([2, 0][:batch]) if cfg.num_modes else None
    with torch.no_grad():
        double, single = diffusers_outputs(ref, cfg, x, hint, t, ctx, y, guidance, mode)
        out = ours(x, hint, t, ctx, y, guidance, control_mode=mode)
    assert_close(out.double, double)
    assert_close(out.single, single)
    assert out.double[0].shape == (batch, (8 // 2) * (12 // 2), WIDTH)
    assert out.cycle == (name == "pixel")


def test_union_single_mode_and_no_mode(instantx_files):
    """One mode index for the whole batch equals the same index per sample; no mode (ComfyUI without a set type)
    gives a different result (no mode token)."""
    ours = load_ours(instantx_files["union"][1])
    x, hint, t, ctx, y, guidance = flux_inputs(ours.config, 2)
    with torch.no_grad():
        one = ours(x, hint, t, ctx, y, guidance, control_mode=3)
        each = ours(x, hint, t, ctx, y, guidance, control_mode=torch.tensor([3, 3]))
        none = ours(x, hint, t, ctx, y, guidance)
    assert_close(one.double + one.single, each.double + each.single, tol=0)
    assert rel_err(none.double[0], one.double[0]) > 1e-3


# parity with ComfyUI


def comfy_instantx(comfy, path):
    """ComfyUI's ControlNetFlux filled from the file as `load_controlnet_flux_instantx` fills it (ComfyUI's own key
    conversion), but built directly: its loader takes the model's shape from Flux.1 detection, which fixes 24 heads of
    128 (see test_comfy_loader_fixes_full_width)."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_detection
    import comfy.ops

    src = open_checkpoint(path)
    rest = {k: src.get(k) for k in src.keys()}
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    sd = comfy.model_detection.convert_diffusers_mmdit(rest, "")  # pops what it converts from `rest`
    sd.update(rest)
    model = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=True, num_union_modes=cfg.num_modes, control_latent_channels=sd["pos_embed_input.weight"].shape[1] // 4,
        operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu",
        **comfy_params(cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def comfy_control(model, x, hint, t, ctx, y, guidance, mode=None) -> dict:
    out = model(x=x, timesteps=t, context=ctx, y=y, guidance=guidance, hint=hint, control_type=[] if mode is None else [mode])
    return {"input": list(out["input"]), "output": list(out.get("output", []))}


def assert_same_control(mine: dict, theirs: dict, tol=TOL):
    assert len(mine["input"]) == COMFY_DOUBLE_SLOTS and len(theirs["input"]) == COMFY_DOUBLE_SLOTS
    assert_close(mine["input"], theirs["input"], tol)
    assert_close(mine["output"], theirs["output"], tol)


def test_comfy_loader_fixes_full_width(comfy, instantx_files):
    """Why the ComfyUI comparisons build its class directly: its loader's Flux detection assumes 24 heads."""
    import comfy.controlnet

    with pytest.raises(Exception, match="divisible by num_heads 24"):
        comfy.controlnet.load_controlnet(str(instantx_files["plain"][1]))


@pytest.mark.parametrize("name", [n for n in INSTANTX if n != "pixel"])  # ComfyUI runs no diffusers-converted XLabs file
@pytest.mark.parametrize("size", [(8, 12), (7, 9)], ids=["even", "odd"])
def test_instantx_matches_comfy(comfy, instantx_files, name, size):
    """Same file through ComfyUI's class: the same `control` dict (19 + 38 entries, repeated block-wise); odd latent
    sizes padded as the host pads; the batch-1 hint shared as the host broadcasts it."""
    path = instantx_files[name][1]
    ours = load_ours(path)
    theirs = comfy_instantx(comfy, path)
    x, hint, t, ctx, y, guidance = flux_inputs(ours.config, 2, *size, hint_batch=1)
    modes = [None, 1] if ours.config.num_modes else [None]
    for mode in modes:
        with torch.no_grad():
            mine = ours(x, hint, t, ctx, y, guidance, control_mode=mode).host_control()
            expected = comfy_control(theirs, x, hint.expand(2, -1, -1, -1), t, ctx, y, guidance, mode)
        assert_same_control(mine, expected)
        assert len(mine["output"]) == (COMFY_SINGLE_SLOTS if ours.config.num_single_layers else 0)


@pytest.fixture(scope="module")
def bfl_files(comfy, tmp_path_factory):
    """XLabs and MistoLine files: ComfyUI's own classes with random weights, saved under the files' key names."""
    d = tmp_path_factory.mktemp("flux_bfl")
    out = {}
    for name, mistoline, single in (("xlabs", False, 0), ("mistoline", True, 2)):
        model = comfy_bfl_controlnet(comfy, mistoline, 2, single, seed=4)
        out[name] = (save(d / f"{name}.safetensors", bfl_file_state(model, mistoline)), model)
    return out


@pytest.mark.parametrize("name", ["xlabs", "mistoline"])
@pytest.mark.parametrize("batch", [1, 2])
def test_bfl_layouts_match_comfy(comfy, bfl_files, name, batch):
    """XLabs / MistoLine files: detected, sized from shapes, loaded strictly, and ComfyUI's `control` dict (cycled)."""
    import comfy.controlnet

    path, theirs = bfl_files[name]
    src = open_checkpoint(path)
    assert flux_layout(src.keys()) == name
    ours = load_ours(path)
    assert (ours.config.num_layers, ours.config.num_single_layers, ours.config.pixel_hint) == (2, 2 if name == "mistoline" else 0, True)
    # the file's tensors, read back through ComfyUI's own MistoLine renaming, are the weights its class holds
    sd = {k: src.get(k) for k in src.keys()}
    if name == "mistoline":
        sd = comfy.controlnet.convert_mistoline(sd)
    assert set(sd) == set(theirs.state_dict())
    x, hint, t, ctx, y, guidance = flux_inputs(ours.config, batch, hint_batch=1)
    with torch.no_grad():
        out = ours(x, hint, t, ctx, y, guidance)
        expected = comfy_control(theirs, x, hint.expand(batch, -1, -1, -1), t, ctx, y, guidance)
    assert out.cycle
    assert_same_control(out.host_control(), expected)
    assert [o.shape for o in out.single] == [(batch, 24, WIDTH)] * ours.config.num_single_layers


# the block rule


class _PassDouble(torch.nn.Module):
    def forward(self, img, txt, vec, pe, **kwargs):
        return img, txt


class _PassSingle(torch.nn.Module):
    def forward(self, img, vec, pe, **kwargs):
        return img


@pytest.mark.parametrize("double, single, latent_input", [
    (2, 0, True), (5, 10, True), (4, 1, True), (6, 0, True), (19, 38, True), (20, 40, True), (1, 1, True),
    (2, 0, False), (3, 2, False), (5, 10, False), (19, 38, False), (25, 1, False),
])
def test_host_list_is_comfys(comfy, double, single, latent_input):
    """Which output fills each slot of ComfyUI's `control` lists, read off its own Flux ControlNet forward at full
    width on the meta device, blocks stubbed out (only its output loop is under test; it never reads values)."""
    import comfy.ldm.flux.controlnet
    import comfy.ops

    params = comfy_params(double, single, True, width=3072, heads=24, axes=[16, 56, 56])
    net = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=latent_input, operations=comfy.ops.disable_weight_init,
                                                   dtype=torch.float32, device="meta", **params)
    net.double_blocks = torch.nn.ModuleList([_PassDouble() for _ in net.double_blocks])
    net.single_blocks = torch.nn.ModuleList([_PassSingle() for _ in net.single_blocks])
    made = {}
    for group, layers in (("double", net.controlnet_blocks), ("single", net.controlnet_single_blocks)):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda mod, args, out, key=(group, i): made.__setitem__(id(out), key))
    meta = dict(device="meta")
    hint = torch.zeros(1, 16, 4, 4, **meta) if latent_input else torch.zeros(1, 3, 32, 32, **meta)
    with torch.no_grad():
        out = net(x=torch.zeros(1, 16, 4, 4, **meta), timesteps=torch.zeros(1, **meta), context=torch.zeros(1, 3, CONTEXT_DIM, **meta),
                  y=torch.zeros(1, POOLED_DIM, **meta), guidance=torch.zeros(1, **meta), hint=hint)
    read = {g: [made[id(o)] for o in out.get(k, [])] for g, k in (("double", "input"), ("single", "output"))}
    assert all(key[0] == g for g, keys in read.items() for key in keys)
    cycle = not latent_input
    assert [i for _, i in read["double"]] == host_sources(double, cycle=cycle, slots=COMFY_DOUBLE_SLOTS)
    assert [i for _, i in read["single"]] == host_sources(single, cycle=cycle, slots=COMFY_SINGLE_SLOTS)


def _tagged(n: int, tokens: int, width: int) -> tuple[torch.Tensor, ...]:
    """Control outputs whose every value is their index + 1, so what a base block received can be read back."""
    return tuple(torch.full((1, tokens, width), float(i + 1)) for i in range(n))


def _read_tag(t: torch.Tensor):
    v = t.flatten().unique()
    assert v.numel() == 1
    return None if float(v) == 0 else int(v) - 1


class _Record(torch.nn.Module):
    """A stubbed base block: records the image tokens it receives (the previous block's control only, since every
    stub outputs zeros), then outputs zeros."""

    def __init__(self, log: list, text_tokens: int = 0, diffusers_style: bool = False, single: bool = False):
        super().__init__()
        self.log, self.text_tokens, self.diffusers_style, self.single = log, text_tokens, diffusers_style, single

    def forward(self, *args, **kwargs):
        if self.diffusers_style:
            img, txt = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            self.log.append(img.clone())
            return torch.zeros_like(txt), torch.zeros_like(img)
        img = kwargs["img"] if "img" in kwargs else args[0]
        self.log.append(img[:, self.text_tokens:].clone() if self.single else img.clone())
        return torch.zeros_like(img) if self.single else (torch.zeros_like(img), torch.zeros_like(kwargs["txt"]))


class _Final(torch.nn.Module):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def forward(self, img, *args, **kwargs):
        self.log.append(img.clone())
        return img


def _received(log: list, n_double: int) -> tuple[list, list]:
    """Block k's control arrives as the input of the block after it (or of the final layer)."""
    tags = [_read_tag(t) for t in log[1:]]
    return tags[:n_double], tags[n_double:]


@pytest.mark.parametrize("n_double, n_single, base_double, base_single, cycle", [
    (5, 10, 19, 38, False), (2, 0, 19, 38, False), (6, 0, 8, 16, False), (5, 10, 8, 20, False), (5, 10, 25, 44, False),
    (2, 0, 19, 38, True), (3, 2, 19, 38, True), (3, 2, 8, 16, True), (2, 0, 24, 40, True),
])
def test_base_reads_comfys_rule(comfy, n_double, n_single, base_double, base_single, cycle):
    """ComfyUI's own Flux base (blocks stubbed) receives, after each block, the output `flux_base_sources` names."""
    import comfy.ldm.flux.model
    import comfy.ops

    tokens, text = 6, 3
    base = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu",
                                     **{**comfy_params(0, 0, False), "vec_in_dim": 8, "context_in_dim": 8})
    randomize_(base)
    log = []
    base.double_blocks = torch.nn.ModuleList([_Record(log) for _ in range(base_double)])
    base.single_blocks = torch.nn.ModuleList([_Record(log, text, single=True) for _ in range(base_single)])
    base.final_layer = _Final(log)
    out = FluxControlOutput(_tagged(n_double, tokens, WIDTH), _tagged(n_single, tokens, WIDTH), cycle=cycle)
    ids = position_ids(0, 2, 3)[None]
    with torch.no_grad():
        base.forward_orig(torch.zeros(1, tokens, 64), ids, torch.zeros(1, text, 8), torch.zeros(1, text, 3), torch.zeros(1),
                          torch.zeros(1, 8), control=out.host_control(), transformer_options={})
    double, single = _received(log, base_double)
    assert (double, single) == flux_base_sources(n_double, n_single, base_double, base_single, cycle=cycle)
    mine = out.for_base(base_double, base_single)
    assert [None if t is None else _read_tag(t) for t in mine[0]] == double


@pytest.mark.parametrize("n_double, n_single, base_double, base_single, cycle", [
    (5, 10, 19, 38, False), (2, 0, 19, 38, True), (3, 2, 19, 38, True), (5, 10, 8, 20, False), (2, 1, 24, 40, True),
])
def test_diffusers_rule_and_where_it_differs(n_double, n_single, base_double, base_single, cycle):
    """diffusers' FluxTransformer2DModel (blocks stubbed): `diffusers_block_sources` is what it does; it equals
    ComfyUI's rule on a 19 + 38 base except for cycled single outputs, and differs on other depths."""
    tokens, text = 6, 3
    base = diffusers.FluxTransformer2DModel(in_channels=64, num_layers=0, num_single_layers=0, attention_head_dim=HEAD_DIM,
                                            num_attention_heads=HEADS, joint_attention_dim=8, pooled_projection_dim=8,
                                            axes_dims_rope=AXES)
    randomize_(base).eval()
    log = []
    base.transformer_blocks = torch.nn.ModuleList([_Record(log, diffusers_style=True) for _ in range(base_double)])
    base.single_transformer_blocks = torch.nn.ModuleList([_Record(log, diffusers_style=True) for _ in range(base_single)])
    base.norm_out = _Final(log)
    with torch.no_grad():
        base(hidden_states=torch.zeros(1, tokens, 64), encoder_hidden_states=torch.zeros(1, text, 8), pooled_projections=torch.zeros(1, 8),
             timestep=torch.zeros(1), img_ids=position_ids(0, 2, 3), txt_ids=torch.zeros(text, 3),
             controlnet_block_samples=list(_tagged(n_double, tokens, WIDTH)),
             controlnet_single_block_samples=list(_tagged(n_single, tokens, WIDTH)) or None, controlnet_blocks_repeat=cycle)
    double, single = _received(log, base_double)
    assert double == diffusers_block_sources(n_double, base_double, cycle=cycle)
    assert single == diffusers_block_sources(n_single, base_single, cycle=False)
    comfy_double, comfy_single = flux_base_sources(n_double, n_single, base_double, base_single, cycle=cycle)
    same_base = (base_double, base_single) == (19, 38)
    assert (double == comfy_double) == same_base
    assert (single == comfy_single) == (same_base and not (cycle and n_single > 1))


def test_block_rule_examples():
    assert host_sources(5, cycle=False, slots=19) == [k // 4 for k in range(19)]
    assert host_sources(2, cycle=True, slots=19) == [k % 2 for k in range(19)]
    assert host_sources(0, cycle=False, slots=38) == []
    assert flux_base_sources(6, 0, cycle=False) == ([k // 4 for k in range(19)], [None] * 38)
    assert flux_base_sources(2, 0, 21, 0, cycle=True)[0] == [k % 2 for k in range(19)] + [None, None]
    assert diffusers_block_sources(6, 19, cycle=False) == [k // 4 for k in range(19)]
    assert diffusers_block_sources(5, 8, cycle=False) == [k // 2 for k in range(8)]
    assert host_sources(5, cycle=False, slots=19)[:8] == [0, 0, 0, 0, 1, 1, 1, 1]  # ComfyUI on an 8-block base


# dtypes, batches, inputs


@pytest.mark.parametrize("name", ["union", "inpaint", "xlabs", "mistoline"])
def test_bfloat16_smoke(instantx_files, bfl_files, name):
    path = instantx_files[name][1] if name in instantx_files else bfl_files[name][0]
    ref = load_ours(path)
    ours = load_ours(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    x, hint, t, ctx, y, guidance = flux_inputs(ours.config, 2)
    mode = 1 if ours.config.num_modes else None
    with torch.no_grad():
        expected = ref(x, hint, t, ctx, y, guidance, **({"control_mode": mode} if mode is not None else {}))
        bf = (a.to(torch.bfloat16) for a in (x, hint, ctx, y))
        x, hint, ctx, y = bf
        out = ours(x, hint, t, ctx, y, guidance, **({"control_mode": mode} if mode is not None else {}))
    for a, b in zip(out.double + out.single, expected.double + expected.single):
        assert a.dtype == torch.bfloat16 and bool(torch.isfinite(a).all())
        assert rel_err(a, b) <= 5e-2


@pytest.mark.parametrize("name", ["inpaint", "xlabs"])
def test_hint_of_batch_one_is_shared(instantx_files, bfl_files, name):
    path = instantx_files[name][1] if name in instantx_files else bfl_files[name][0]
    ours = load_ours(path)
    x, hint, t, ctx, y, guidance = flux_inputs(ours.config, 2, hint_batch=1)
    with torch.no_grad():
        shared = ours(x, hint, t, ctx, y, guidance)
        expanded = ours(x, hint.expand(2, -1, -1, -1), t, ctx, y, guidance)
    assert_close(shared.double + shared.single, expanded.double + expanded.single, tol=0)


def test_fp8_stored_weights_load_into_a_compute_dtype(tmp_path):
    """float8_e4m3fn tensors (as fp8 files store them) load into a model built in float32 or bfloat16: the same
    numbers as the fp8 values upcast, and the shapes read from the file's header are unchanged."""
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in diffusers_flux("union", seed=2).state_dict().items()}
    path = save(tmp_path / "fp8.safetensors", sd)
    src = open_checkpoint(path)
    assert {src.stored_dtype(k) for k in src.keys()} == {torch.float8_e4m3fn}
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    x, hint, t, ctx, y, guidance = flux_inputs(cfg, 1)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        direct = FluxInstantXControlNet(cfg, dtype=dtype)
        direct.load_state_dict({k: src.get(k) for k in src.keys()}, strict=True)
        upcast = FluxInstantXControlNet(cfg, dtype=dtype)
        upcast.load_state_dict({k: src.get(k).to(dtype) for k in src.keys()}, strict=True)
        args = [a.to(dtype) for a in (x, hint)] + [t, ctx.to(dtype), y.to(dtype), guidance]
        with torch.no_grad():
            a, b = direct.eval()(*args, control_mode=0), upcast.eval()(*args, control_mode=0)
        assert all(torch.equal(p, q) for p, q in zip(a.double + a.single, b.double + b.single))
        results.append(a.double[0])
    assert bool(torch.isfinite(results[0]).all()) and rel_err(results[1], results[0]) <= 5e-2


def test_clear_input_errors(instantx_files, bfl_files):
    inpaint = load_ours(instantx_files["inpaint"][1])
    x, hint, t, ctx, y, guidance = flux_inputs(inpaint.config, 2)
    latent = hint[:, :16]
    with pytest.raises(ControlNetError, match="append_keep_mask"):
        inpaint(x, latent, t, ctx, y, guidance)
    full = append_keep_mask(latent)
    assert full.shape == (2, 17, 8, 12) and bool((full[:, 16] == 1).all())
    with pytest.raises(ControlNetError, match="latent's size"):
        inpaint(x, hint[..., :4], t, ctx, y, guidance)
    with pytest.raises(ControlNetError, match="a Flux latent"):
        inpaint(x[:, :4], hint, t, ctx, y, guidance)
    with pytest.raises(ControlNetError, match="T5 text tokens"):
        inpaint(x, hint, t, ctx[..., :8], y, guidance)
    with pytest.raises(ControlNetError, match="pass guidance"):
        inpaint(x, hint, t, ctx, y)
    with pytest.raises(ControlNetError, match="pooled CLIP-L"):
        inpaint(x, hint, t, ctx, y[:, :8], guidance)
    with pytest.raises(ControlNetError, match="timesteps"):
        inpaint(x, hint, torch.zeros(3), ctx, y, guidance)
    with pytest.raises(ControlNetError, match="not a union one"):
        inpaint(x, hint, t, ctx, y, guidance, control_mode=1)

    union = load_ours(instantx_files["union"][1])
    x, hint, t, ctx, y, guidance = flux_inputs(union.config, 2)
    with pytest.raises(ControlNetError, match=r"each in 0\.\.3"):
        union(x, hint, t, ctx, y, guidance, control_mode=4)
    with pytest.raises(ControlNetError, match="VAE-encoded"):
        union(x, torch.rand(2, 3, 64, 96), t, ctx, y, guidance)

    xlabs = load_ours(bfl_files["xlabs"][0])
    x, hint, t, ctx, y, guidance = flux_inputs(xlabs.config, 2)
    with pytest.raises(ControlNetError, match="8x the latent's size"):
        xlabs(x, hint[..., :32, :], t, ctx, y, guidance)
    with pytest.raises(ControlNetError, match="condition image itself"):
        xlabs(x, torch.randn(2, 16, 8, 12), t, ctx, y, guidance)
    # odd latent sizes: the encoded hint is padded like the latent (ComfyUI itself cannot run XLabs files there)
    x, hint, t, ctx, y, guidance = flux_inputs(xlabs.config, 1, 7, 9)
    with torch.no_grad():
        assert xlabs(x, hint, t, ctx, y, guidance).double[0].shape == (1, 4 * 5, WIDTH)


def test_hint_latent_from_vae_is_the_flux_latent_format(comfy):
    import comfy.latent_formats

    latent = torch.randn(1, 16, 4, 4)
    assert torch.allclose(hint_latent_from_vae(latent), comfy.latent_formats.Flux().process_in(latent))
