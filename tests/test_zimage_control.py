"""Z-Image Fun ControlNets (alibaba-pai, versions 1 / 2.0 / 2.1; a model patch): detection, sizes from shapes, broken
files, the 2.0 file's all-zero refiner workaround, save round trip, and parity with diffusers' `ZImageControlNetModel`
on the same random weights read from real .safetensors files (fp32, rel. err <= 1e-5, every output: main blocks and,
for 2.x, the noise-refiner outputs diffusers keeps internal, caught with forward hooks).

diffusers' model needs the base's pieces (`from_transformer`): a tiny random-weight `ZImageTransformer2DModel` gives
them, and the same pieces, caught with hooks during diffusers' forward, drive ours (timestep embedding, the image
tokens entering the noise refiner, the refined caption features, the tokens / rotary table / mask entering the main
blocks). The published file's keys are diffusers' state-dict keys, so the files are written from diffusers' models; the
one conversion is diffusers' own for the broken 2.0 file (its `add_control_noise_refiner="control_layers"` model has no
`control_noise_refiner` weights: they are dropped, as diffusers' single-file loader does).

Tiny sizes: width 64 (2 heads of 32, rotary axes (8, 12, 12)), 3 (version 1) or 4 (2.x) control layers, so the stride
over the base's 30 blocks is 10 and 8 (the published 6 and 15 give 5 and 2: test_published_sizes_and_places)."""
import dataclasses
import logging

import pytest
import torch
from factories import randomize_, rel_err, save

from controlnet_core.checkpoint import open_checkpoint
from controlnet_core.errors import CheckpointError, ControlNetError
from controlnet_core.formats import REGISTRY, find_format
from controlnet_core.formats.zimage_keys import FORMAT, SIGNATURE, ZERO_REFINER, config_from_shapes, is_zimage_fun
from controlnet_core.loading import LoadOptions
from controlnet_core.qwen.blockwise import QwenBlockwiseConfig, QwenBlockwiseControlNet
from controlnet_core.zimage import REFINER_FROM_CONTROL_LAYERS, REFINER_OWN, ZImageFunConfig, ZImageFunControlNet, patchify, rope_cos_sin

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "ZImageControlNetModel"):
    pytest.skip("this diffusers has no ZImageControlNetModel", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")  # raised inside diffusers' own Flux classes

TOL = 1e-5
DIM, HEADS, AXES = 64, 2, (8, 12, 12)
CAP_DIM = 32
# name -> (control layers, places over 30 base blocks, hint channels, diffusers' add_control_noise_refiner)
VARIANTS = {
    "v1": (3, [0, 10, 20], 16, None),
    "v2.1": (4, [0, 8, 16, 24], 33, "control_noise_refiner"),
}


def diffusers_control(name: str, seed: int = 0, mode=None):
    layers, places, channels, refiner = VARIANTS[name]
    model = diffusers.ZImageControlNetModel(
        control_layers_places=places, control_refiner_layers_places=[0, 1], control_in_dim=channels,
        add_control_noise_refiner=mode or refiner, dim=DIM, n_heads=HEADS, n_kv_heads=HEADS)
    return randomize_(model, seed).eval()


@pytest.fixture(scope="module")
def base():
    """The tiny Z-Image base whose pieces both ControlNets use."""
    model = diffusers.ZImageTransformer2DModel(dim=DIM, n_layers=1, n_refiner_layers=2, n_heads=HEADS, n_kv_heads=HEADS,
                                               cap_feat_dim=CAP_DIM, axes_dims=list(AXES), axes_lens=[256, 64, 64])
    return randomize_(model, 7).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random-weight files of the published layout: v1, v2.1, and 2.0 (v2.1's with a zero refiner `after_proj`)."""
    d = tmp_path_factory.mktemp("zimage")
    out = {}
    for name, seed in (("v1", 1), ("v2.1", 2)):
        out[name] = save(d / f"zimage_fun_{name}.safetensors", diffusers_control(name, seed).state_dict())
    sd = diffusers_control("v2.1", 3).state_dict()
    sd[ZERO_REFINER] = torch.zeros_like(sd[ZERO_REFINER])
    out["v2.0"] = save(d / "zimage_fun_v2.0.safetensors", sd)
    return out


def load_ours(path, **kw) -> ZImageFunControlNet:
    return FORMAT.load(open_checkpoint(path), LoadOptions(**kw)).model


def reference_from_file(path, name: str, mode=None):
    """diffusers' model on the file's weights (2.0: without the refiner weights, as its single-file loader does)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    if mode == "control_layers":
        sd = {k: v for k, v in sd.items() if not k.startswith("control_noise_refiner.")}
    ref = diffusers_control(name, mode=mode)
    ref.load_state_dict(sd, strict=True)
    return ref


def inputs(channels: int, h: int = 16, w: int = 16, batch: int = 2, cap_len: int = 20, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=g)
    hint = torch.randn(batch, channels, h, w, generator=g)
    caps = [torch.randn(cap_len, CAP_DIM, generator=g) for _ in range(batch)]
    t = torch.tensor([0.9, 0.35][:batch])
    return x, hint, caps, t


def run_diffusers(ref, base, x, hint, caps, t, refiner_mode):
    """diffusers' outputs plus the base's pieces it used, caught with hooks."""
    ref = diffusers.ZImageControlNetModel.from_transformer(ref, base)
    seen, handles = {"control0": [], "last": []}, []
    handles.append(base.t_embedder.register_forward_hook(lambda m, a, o: seen.__setitem__("adaln", o)))
    handles.append(base.noise_refiner[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("refiner_in", a)))
    handles.append(base.context_refiner[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("caption", o)))
    handles.append(ref.control_layers[0].register_forward_pre_hook(lambda m, a: seen["control0"].append(a)))
    refiner_chain = {"control_noise_refiner": ref.control_noise_refiner, "control_layers": ref.control_layers}.get(refiner_mode)
    if refiner_chain is not None:
        handles.append(refiner_chain[-1].register_forward_hook(lambda m, a, o: seen["last"].append(o)))
    try:
        with torch.no_grad():
            out = ref([v[:, None] for v in x], t, caps, [v[:, None] for v in hint])
    finally:
        for h in handles:
            h.remove()
    seen["refiner_out"] = list(torch.unbind(seen["last"][0]))[:2] if refiner_chain is not None else []
    return out, seen


def run_ours(net, base, hint, seen, caption=True):
    x_in, x_mask, x_freqs, _ = seen["refiner_in"]
    _, unified, u_mask, u_freqs, _ = seen["control0"][-1]
    with torch.no_grad():
        tokens = net.embed_hint(hint, pad_token=base.x_pad_token, multiple=32)
        steps = net.start(tokens, seen["adaln"], x_freqs, x_mask)
        refiner = [steps.after_refiner_block(i, x_in) for i in range(2)]
        blocks = {}
        for k in range(30):
            out = (steps.after_base_block(k, unified, rope=u_freqs, mask=u_mask, caption=seen["caption"]) if caption
                   else steps.after_base_block(k, unified[:, :tokens.shape[1]]))
            if out is not None:
                blocks[k] = out
    return refiner, blocks


@pytest.mark.parametrize("name,size", [("v1", (16, 16)), ("v2.1", (16, 16)), ("v2.1", (12, 16)), ("v2.0", (16, 16))])
def test_matches_diffusers(files, base, name, size):
    """(12, 16): 48 image tokens, padded to 64 with the base's pad token, as diffusers pads them."""
    arch = "v1" if name == "v1" else "v2.1"
    mode = {"v1": None, "v2.1": "control_noise_refiner", "v2.0": "control_layers"}[name]
    ref = reference_from_file(files[name], arch, mode)
    ours = load_ours(files[name])
    assert ours.config.refiner_source == (REFINER_FROM_CONTROL_LAYERS if name == "v2.0" else REFINER_OWN)
    x, hint, caps, t = inputs(VARIANTS[arch][2], *size)
    theirs, seen = run_diffusers(ref, base, x, hint, caps, t, mode)
    refiner, blocks = run_ours(ours, base, hint, seen)
    assert sorted(blocks) == sorted(theirs) == VARIANTS[arch][1]
    for k in theirs:
        assert theirs[k].norm() > 0 and rel_err(blocks[k], theirs[k]) <= TOL, (name, k, rel_err(blocks[k], theirs[k]))
    if name == "v1":
        assert refiner == [None, None]
    else:
        assert len(seen["refiner_out"]) == 2
        for i in range(2):
            assert rel_err(refiner[i], seen["refiner_out"][i]) <= TOL, (name, i)
            assert seen["refiner_out"][i].norm() > 0


def test_broken_20_differs_from_its_own_refiner(files, base):
    """The workaround matters: the same file read as 2.1 would send zero-ish refiner outputs."""
    ours = load_ours(files["v2.0"])
    own = ZImageFunControlNet(dataclasses.replace(ours.config, refiner_source=REFINER_OWN))
    own.load_state_dict(ours.state_dict())
    x, hint, caps, t = inputs(33)
    _, seen = run_diffusers(reference_from_file(files["v2.0"], "v2.1", "control_layers"), base, x, hint, caps, t, "control_layers")
    a, _ = run_ours(ours, base, hint, seen)
    b, _ = run_ours(own, base, hint, seen)
    assert rel_err(b[0], a[0]) > 0.5


def test_image_only_run_and_comfy_rope(files, base):
    """ComfyUI's way: no caption, image tokens only, its real rotation matrices; the same as the complex table."""
    net = load_ours(files["v2.1"])
    x, hint, caps, t = inputs(33)
    _, seen = run_diffusers(diffusers_control("v2.1"), base, x, hint, caps, t, "control_noise_refiner")
    complex_run = run_ours(net, base, hint, seen, caption=False)
    freqs = seen["refiner_in"][2]
    cos, sin = freqs.real, freqs.imag
    real = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2).unsqueeze(2)  # (B, T, 1, D/2, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(rope_cos_sin(real), rope_cos_sin(freqs)))
    seen = dict(seen, refiner_in=seen["refiner_in"][:2] + (real,) + seen["refiner_in"][3:])
    real_run = run_ours(net, base, hint, seen, caption=False)
    for a, b in zip(complex_run[0] + list(complex_run[1].values()), real_run[0] + list(real_run[1].values())):
        assert rel_err(b, a) <= TOL
    with_caption = run_ours(net, base, hint, dict(seen, refiner_in=seen["refiner_in"]))[1]
    assert rel_err(complex_run[1][8], with_caption[8][:, :64]) > 1e-3  # the caption tokens do change the outputs


def test_detection_and_sizes(files):
    for name, (layers, _, channels, _) in VARIANTS.items():
        keys = frozenset(open_checkpoint(files[name]).keys())
        assert find_format(keys) is FORMAT and is_zimage_fun(keys)
        assert [f.name for f in REGISTRY if f is not FORMAT and f.detect(keys)] == []
        cfg = load_ours(files[name]).config
        assert (cfg.dim, cfg.head_dim, cfg.heads, cfg.ffn_dim, cfg.adaln_dim) == (DIM, DIM // HEADS, HEADS, int(DIM / 3 * 8), DIM)
        assert (cfg.num_control_layers, cfg.hint_channels, cfg.num_refiner_layers) == (layers, channels, 2)
        assert cfg.refiner_control == (name != "v1") and cfg.inpainting == (name != "v1")
    assert FORMAT.kind == "zimage_patch" and FORMAT.takes_latent_hint and FORMAT.inference_dtypes == ("bfloat16", "float32")
    for k in SIGNATURE:
        assert not is_zimage_fun(set(SIGNATURE) - {k})


def test_other_layouts_are_not_detected(base):
    qwen_patch = set(QwenBlockwiseControlNet(QwenBlockwiseConfig(hidden_size=8, num_layers=2), device="meta").state_dict())
    flux = set(diffusers.FluxControlNetModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                             joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]).state_dict())
    qwen = set(diffusers.QwenImageControlNetModel(num_layers=1, attention_head_dim=64, num_attention_heads=1, joint_attention_dim=32,
                                                  axes_dims_rope=(8, 28, 28)).state_dict())
    for keys in (qwen_patch, flux, qwen, set(base.state_dict())):
        assert not is_zimage_fun(keys)


def test_published_sizes_and_places():
    """Full-size shapes (on meta): the published v1 and 2.x, and the base blocks each control layer feeds."""
    for layers, channels, refiner, places in ((6, 16, False, tuple(range(0, 30, 5))), (15, 33, True, tuple(range(0, 30, 2)))):
        cfg = ZImageFunConfig(num_control_layers=layers, hint_channels=channels, refiner_control=refiner)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in ZImageFunControlNet(cfg).state_dict().items()}
        assert config_from_shapes(shapes) == cfg
        assert (cfg.heads, cfg.ffn_dim, cfg.adaln_dim) == (30, 10240, 256)
        assert cfg.layer_places() == places and cfg.refiner_places() == ((0, 1) if refiner else ())
        assert cfg.layer_for_block(places[1]) == 1 and cfg.layer_for_block(places[1] + 1) is None


def shapes_of(path) -> dict:
    src = open_checkpoint(path)
    return {k: tuple(src.shape(k)) for k in src.keys()}


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update({"control_all_x_embedder.2-1.weight": (DIM, 80)}), r"'control_all_x_embedder.2-1.weight' takes 80 features"),
    (lambda s: s.pop("control_layers.0.attention.norm_q.weight"), r"no 'control_layers.0.attention.norm_q.weight'"),
    (lambda s: s.update({"control_layers.2.feed_forward.w2.weight": (DIM, 99)}), r"'control_layers.2.feed_forward.w2.weight' has shape \[64, 99\]"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("control_layers.1.")], r"'control_layers' are numbered up to 3, but 1 are missing"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("control_noise_refiner.")], r"no 'control_noise_refiner' blocks"),
    (lambda s: [s.pop(k) for k in list(s) if "control_noise_refiner" in k and "_proj" in k], r"holds plain blocks \(version 1\)"),
    (lambda s: s.update({"control_layers.0.adaLN_modulation.0.weight": (4 * DIM, 32)}), r"takes 32 features; expected min\(width 64, 256\)"),
    (lambda s: s.update({"control_layers.0.attention.norm_q.weight": (24,)}), r"not a whole number of heads of 24"),
])
def test_broken_shapes_name_the_key(files, edit, match):
    shapes = shapes_of(files["v2.1"])
    edit(shapes)
    with pytest.raises(CheckpointError, match=match):
        config_from_shapes(shapes)


def test_strict_load_names_unexpected_keys(files, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(files["v1"]))
    sd["control_layers.0.attention.to_out.0.bias"] = torch.zeros(DIM)
    with pytest.raises(CheckpointError, match=r"unexpected 1: \['control_layers.0.attention.to_out.0.bias'\]"):
        load_ours(save(tmp_path / "extra.safetensors", sd))
    sd = load_file(str(files["v1"]))
    sd["control_layers.1.after_proj.bias"][0] = float("nan")
    with pytest.raises(ControlNetError, match="NaN"):
        load_ours(save(tmp_path / "nan.safetensors", sd))


def test_zero_refiner_workaround_is_logged(files, caplog):
    with caplog.at_level(logging.INFO, logger="controlnet_core.formats.zimage_keys"):
        assert load_ours(files["v2.0"]).config.refiner_source == REFINER_FROM_CONTROL_LAYERS
    lines = [r for r in caplog.records if ZERO_REFINER in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "zimage_fun_v2.0.safetensors" in lines[0].getMessage() and "control layers" in lines[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="controlnet_core.formats.zimage_keys"):
        load_ours(files["v2.1"])
    assert not [r for r in caplog.records if ZERO_REFINER in r.getMessage()]


@pytest.mark.parametrize("name", ["v1", "v2.0"])
def test_save_round_trip(files, tmp_path, name):
    lc = FORMAT.load(open_checkpoint(files[name]), LoadOptions())
    out = FORMAT.save(lc.model, tmp_path / "again.safetensors", None, False)
    a, b = open_checkpoint(files[name]), open_checkpoint(out)
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    assert load_ours(out).config == lc.model.config


def test_fp8_file_stays_fp8(files, tmp_path):
    lc = FORMAT.load(open_checkpoint(files["v2.0"]), LoadOptions())
    path = FORMAT.save(lc.model, tmp_path / "fp8.safetensors", torch.float8_e4m3fn, False)
    net = load_ours(path, keep_fp8=True)
    assert net.control_layers[0].attention.to_q.weight.dtype == torch.float8_e4m3fn
    assert net.config.refiner_source == REFINER_FROM_CONTROL_LAYERS  # the zero check reads fp8 too
    tokens = net.embed_hint(torch.randn(1, 33, 4, 4))
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (1, 4, DIM)
    rope = torch.polar(torch.ones(1, 4, 16), torch.rand(1, 4, 16))
    steps = net.start(tokens, torch.randn(1, DIM), rope)  # fp32 base pieces into a bf16 control: cast where used
    outs = [steps.after_refiner_block(i, torch.randn(1, 4, DIM)) for i in range(2)]
    outs += [o for k in range(30) if (o := steps.after_base_block(k, torch.randn(1, 4, DIM))) is not None]
    assert len(outs) == 6 and all(o.dtype == torch.bfloat16 and o.isfinite().all() for o in outs)


def test_hint_and_hook_errors(files):
    net = load_ours(files["v2.1"])
    with pytest.raises(ControlNetError, match=r"takes \[B, 33, H, W\]"):
        net.embed_hint(torch.randn(1, 16, 8, 8))
    with pytest.raises(ControlNetError, match="pad token"):
        net.embed_hint(torch.randn(1, 33, 6, 8), multiple=32)
    assert patchify(torch.arange(2 * 2 * 2.0).reshape(1, 2, 2, 2)).tolist() == [[[0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]]]
    tokens = net.embed_hint(torch.randn(1, 33, 8, 8))
    g = torch.Generator().manual_seed(0)
    rope = torch.polar(torch.ones(1, 16, 16), torch.rand(1, 16, 16, generator=g))
    steps = net.start(tokens, torch.randn(1, DIM), rope)
    with pytest.raises(ControlNetError, match="noise-refiner hooks before its main blocks"):
        steps.after_base_block(0, torch.randn(1, 16, DIM))
    with pytest.raises(ControlNetError, match="out of order"):
        steps.after_refiner_block(1, torch.randn(1, 16, DIM))
    with pytest.raises(ControlNetError, match=r"takes \[B, 64\]"):
        net.start(tokens, torch.randn(1, 256), rope)
    with pytest.raises(ControlNetError, match="impossible ZImageFunConfig"):
        ZImageFunConfig(dim=64, head_dim=32, adaln_dim=64, hint_channels=16, refiner_source=REFINER_FROM_CONTROL_LAYERS)


def comfy_rope(freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' complex table -> ComfyUI's rotation matrices (B, T, 1, D/2, 2, 2), as Lumina2 hands its patches."""
    cos, sin = freqs.real, freqs.imag
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2).unsqueeze(2)


@pytest.mark.parametrize("name", ["v1", "v2.1", "v2.0"])
def test_matches_comfyui_patch(comfy, files, base, name):
    """ComfyUI 0.8.0's own `ZImageControlPatch` hook (its block rule, its `broken` workaround) on ComfyUI's
    `ZImage_Control` loaded from the same file through `z_image_convert`, against our image-only run (no caption, as
    ComfyUI does). Each hook gets a zero `img`, so what it adds is the control output. Skipped on hosts without Z-Image
    Fun (run with COMFYUI_PATH=/work/hosts/comfyui-0.8.0). ComfyUI's q/k RMSNorms use torch's default eps, ours
    diffusers' 1e-5: hence 2e-5 (measured: about 3e-6)."""
    try:
        import comfy.ldm.lumina.controlnet as zc
        import comfy.ops
        from comfy_extras.nodes_model_patch import ZImageControlPatch, z_image_convert
    except ImportError:
        pytest.skip("this ComfyUI has no Z-Image Fun ControlNet")
    from safetensors.torch import load_file

    arch = "v1" if name == "v1" else "v2.1"
    layers, _, channels, mode = VARIANTS[arch]
    sd = z_image_convert(load_file(str(files[name])))
    extra = dict(additional_in_dim=17, refiner_control=True, broken=name == "v2.0") if channels == 33 else {}
    theirs = zc.ZImage_Control(dim=DIM, n_heads=HEADS, n_kv_heads=HEADS, multiple_of=1, n_control_layers=layers,
                               operations=comfy.ops.disable_weight_init, **extra)
    theirs.load_state_dict(sd, strict=True)
    patch = ZImageControlPatch.__new__(ZImageControlPatch)
    vae = type("Vae", (), {"spacial_compression_encode": staticmethod(lambda: 8)})()
    x, hint, caps, t = inputs(channels)
    _, seen = run_diffusers(diffusers_control(arch), base, x, hint, caps, t, mode)  # for the base's pieces
    patch.__dict__.update(model_patch=type("P", (), {"model": theirs})(), vae=vae, strength=1.0, encoded_image=hint,
                          encoded_image_size=(x.shape[-2] * 8, x.shape[-1] * 8), temp_data=None, is_inpaint=channels > 16)
    x_in, pe = seen["refiner_in"][0], comfy_rope(seen["refiner_in"][2])
    main_in = seen["control0"][-1][1][:, :x_in.shape[1]]
    ours = load_ours(files[name])
    steps = ours.start(ours.embed_hint(hint), seen["adaln"], pe)

    def hook(i, block_type, tokens):
        img = torch.zeros_like(tokens)
        kw = {"img": img, "img_input": tokens, "txt": seen["caption"], "pe": pe, "vec": seen["adaln"], "x": x, "block_index": i}
        with torch.no_grad():
            patch(dict(kw, block_type=block_type) if block_type else kw)
        return img

    with torch.no_grad():
        for i in range(2):
            ref, got = hook(i, "noise_refiner", x_in), steps.after_refiner_block(i, x_in)
            assert (got is None and not ref.any()) if name == "v1" else rel_err(got, ref) <= 2e-5, (name, "refiner", i)
        for k in range(30):
            ref, got = hook(k, "", main_in), steps.after_base_block(k, main_in)
            assert (not ref.any()) if got is None else (ref.norm() > 0 and rel_err(got, ref) <= 2e-5), (name, k)
