"""Qwen-Image ControlNets of the InstantX layout (diffusers' `QwenImageControlNetModel`: canny / depth, union,
inpainting): detection, shapes -> config, parity with diffusers and with ComfyUI's
`comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel` on the same random weights read from real .safetensors files
(fp32, rel. err <= 1e-5), and ComfyUI's rule for which base block receives which control output, read off ComfyUI's
own ControlNet and Qwen-Image base with stubbed blocks (and diffusers' for comparison).

Tiny sizes: 2 heads of 64 (Qwen-Image's rotary split scaled to 64: (8, 28, 28)), text width 32, 2-5 blocks. ComfyUI's
detection of Qwen-Image fixes the width (24 heads of 128) and the text width (3584), so its class is built directly
(test_comfy_detection_fixes_width)."""
import math

import pytest
import torch
from factories import SD15_TINY, random_controlnet, randomize_, rel_err, save

from controlnet_core.checkpoint import open_checkpoint
from controlnet_core.errors import CheckpointError, ControlNetError
from controlnet_core.flux.layers import pack
from controlnet_core.formats import REGISTRY
from controlnet_core.formats.flux_keys import flux_layout
from controlnet_core.formats.qwen_keys import FORMAT, SIGNATURE, config_from_shapes, is_qwen_instantx
from controlnet_core.formats.sd3_keys import is_sd3_diffusers
from controlnet_core.formats.sd35_keys import is_sd35_stability
from controlnet_core.loading import LoadOptions
from controlnet_core.qwen import (
    COMFY_SLOTS,
    QwenControlNetConfig,
    QwenControlOutput,
    QwenInstantXControlNet,
    append_keep_mask,
    base_block_sources,
    build_qwen_controlnet,
    diffusers_block_sources,
    hint_latent_from_vae,
    host_sources,
)
from controlnet_core.qwen.blocks import position_ids

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "QwenImageControlNetModel"):
    pytest.skip("this diffusers has no QwenImageControlNetModel", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")  # raised inside diffusers' own Flux classes

TOL = 1e-5
HEADS, HEAD_DIM, AXES = 2, 64, (8, 28, 28)
WIDTH = HEADS * HEAD_DIM
CONTEXT_DIM = 32

# name -> (blocks, extra_condition_channels). The union file is this very layout (no control-type keys); its size here
# only gives a run length that does not divide 60 evenly elsewhere (ceil(60 / 5) = 12).
VARIANTS = {
    "plain": (2, 0),  # InstantX canny / depth
    "union": (5, 0),  # InstantX union: canny / soft edge / depth / pose, read off the image
    "inpaint": (2, 4),  # inpainting: 64 latent + 4 packed keep-mask features
}


def diffusers_qwen(name: str, seed: int = 0):
    """A random-weight diffusers `QwenImageControlNetModel` of the variant, at a tiny size."""
    blocks, extra = VARIANTS[name]
    model = diffusers.QwenImageControlNetModel(
        num_layers=blocks, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CONTEXT_DIM,
        axes_dims_rope=AXES, extra_condition_channels=extra)
    return randomize_(model, seed).eval()


def load_ours(path, dtype=None) -> QwenInstantXControlNet:
    """Through the format record, as the loader will: built from the file's shapes, filled strictly."""
    return FORMAT.load(open_checkpoint(path), LoadOptions(dtype=dtype)).model


def qwen_inputs(cfg: QwenControlNetConfig, batch: int, h: int = 8, w: int = 12, seed: int = 3, hint_batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, h, w, generator=g)
    hint = torch.randn(hint_batch or batch, cfg.hint_latent_channels, h, w, generator=g)
    t = torch.tensor([0.95, 0.3, 0.6][:batch])
    ctx = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    return x, hint, t, ctx


def diffusers_outputs(ref, x, hint, t, ctx) -> tuple:
    """diffusers takes packed tokens and the token grid (its pipelines only make even latent sizes)."""
    b = x.shape[0]
    rows, cols = x.shape[2] // 2, x.shape[3] // 2
    return tuple(ref(hidden_states=pack(x), controlnet_cond=pack(hint.expand(b, -1, -1, -1)), encoder_hidden_states=ctx,
                     timestep=t, img_shapes=[(1, rows, cols)] * b, return_dict=False))


def assert_close(ours, theirs, tol=TOL):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"output {k}: {tuple(a.shape)} vs {tuple(b.shape)}"
        assert rel_err(a, b) <= tol, f"output {k}: rel err {rel_err(a, b):.2e}"


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory):
    """name -> (the diffusers model, the .safetensors file of its weights), for every variant."""
    d = tmp_path_factory.mktemp("qwen")
    return {name: (ref := diffusers_qwen(name), save(d / f"qwen_{name}.safetensors", ref.state_dict())) for name in VARIANTS}


@pytest.fixture(params=list(VARIANTS))
def variant(request, qwen_files):
    return (request.param, *qwen_files[request.param])


# detection and config


def test_detected_and_sized_from_shapes(variant):
    name, ref, path = variant
    src = open_checkpoint(path)
    assert is_qwen_instantx(src.keys())
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    blocks, extra = VARIANTS[name]
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.axes_dims_rope, cfg.num_layers) == (WIDTH, HEAD_DIM, HEADS, AXES, blocks)
    assert (cfg.in_channels, cfg.hint_channels, cfg.joint_attention_dim, cfg.mlp_hidden_dim) == (64, 64 + extra, CONTEXT_DIM, 4 * WIDTH)
    assert (cfg.latent_channels, cfg.hint_latent_channels, cfg.extra_conditioning_channels) == (16, 16 + extra // 4, extra // 4)


@pytest.mark.parametrize("config", [
    {},  # diffusers' defaults: 60 blocks of width 3072, the base model's own size
    dict(num_layers=5),  # a union-sized ControlNet
    dict(num_layers=6, extra_condition_channels=4),  # an inpainting one (68 hint features)
], ids=["default", "few-blocks", "inpaint"])
def test_full_size_layout_maps_one_to_one(config):
    """Full Qwen-Image width on the meta device: the same keys and shapes as diffusers' QwenImageControlNetModel."""
    with torch.device("meta"):
        ref = diffusers.QwenImageControlNetModel(**config)
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        cfg = config_from_shapes(theirs)
        ours = {k: tuple(v.shape) for k, v in QwenInstantXControlNet(cfg).state_dict().items()}
    assert ours == theirs
    assert (cfg.hidden_size, cfg.head_dim, cfg.axes_dims_rope, cfg.joint_attention_dim) == (3072, 128, (16, 56, 56), 3584)
    assert cfg.num_layers == config.get("num_layers", 60) and cfg.hint_channels == 64 + config.get("extra_condition_channels", 0)


def test_not_detected_for_other_layouts(comfy, qwen_files):
    """Qwen's detector refuses Flux / SD3 / UNet ControlNets, the Qwen-Image base and DiffSynth's model patch; the
    Flux and SD3 detectors (and every record already in the registry) refuse Qwen keys."""
    import comfy.ldm.qwen_image.model
    import comfy.ops
    from comfy_extras.nodes_model_patch import QwenImageBlockWiseControlNet

    qwen = set(qwen_files["union"][0].state_dict())
    with torch.device("meta"):
        flux_ctl = set(diffusers.FluxControlNetModel(num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                                                     joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=list(AXES)).state_dict())
        sd3 = set(diffusers.SD3ControlNetModel(num_layers=2, num_attention_heads=2, caption_projection_dim=128, sample_size=16,
                                               pos_embed_max_size=16).state_dict())
        unet_cn = set(diffusers.ControlNetModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                                cross_attention_dim=32, norm_num_groups=8).state_dict())
        qwen_base = set(diffusers.QwenImageTransformer2DModel(num_layers=1, attention_head_dim=64, num_attention_heads=2,
                                                              joint_attention_dim=32, axes_dims_rope=AXES).state_dict())
        comfy_base = set(comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
            num_layers=1, attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=AXES,
            operations=comfy.ops.disable_weight_init, device="meta").state_dict())
        diffsynth = set(QwenImageBlockWiseControlNet(num_layers=2, dim=WIDTH, operations=comfy.ops.disable_weight_init).state_dict())
    ldm_cn = set(random_controlnet(SD15_TINY).state_dict())
    for keys in (flux_ctl, sd3, unet_cn, qwen_base, comfy_base, diffsynth, ldm_cn):
        assert not is_qwen_instantx(keys)
    assert flux_layout(qwen) is None and not is_sd3_diffusers(qwen) and not is_sd35_stability(qwen)
    assert [f.name for f in REGISTRY if f.name != FORMAT.name and f.detect(frozenset(qwen))] == []
    assert is_qwen_instantx(SIGNATURE)
    for k in SIGNATURE:
        assert not is_qwen_instantx(set(SIGNATURE) - {k})
    with pytest.raises(CheckpointError, match="not those of a Qwen-Image ControlNet"):
        config_from_shapes({k: (1,) for k in flux_ctl})


def _shapes(name="union"):
    return {k: tuple(v.shape) for k, v in diffusers_qwen(name).state_dict().items()}


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"controlnet_x_embedder.weight": (128, 66)}), "whole 2x2 packed pixels"),
    (lambda s: s.update({"controlnet_x_embedder.weight": (128, 32)}), "controlnet_x_embedder"),
    (lambda s: s.update({"img_in.weight": (128, 62)}), "multiple of 4"),
    (lambda s: s.update({"txt_in.weight": (128, 48)}), "txt_in.weight"),
    (lambda s: s.update({"transformer_blocks.0.attn.norm_q.weight": (16,)}), "rotary split"),
    (lambda s: s.update({"transformer_blocks.0.attn.norm_q.weight": (96,)}), "does not divide"),
    (lambda s: s.update({"transformer_blocks.3.attn.norm_added_k.weight": (32,)}), "norm_added_k"),
    (lambda s: s.update({"transformer_blocks.2.txt_mlp.net.0.proj.weight": (256, 128)}), "feed-forward width"),
    (lambda s: s.update({"transformer_blocks.1.img_mod.1.weight": (384, 128)}), "img_mod.1.weight"),
    (lambda s: s.update({"time_text_embed.timestep_embedder.linear_1.weight": (128, 128)}), "256-wide timestep"),
    (lambda s: s.pop("controlnet_blocks.4.weight") and s.pop("controlnet_blocks.4.bias"), "controlnet_blocks"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("transformer_blocks.1.")], "missing"),
    (lambda s: s.pop("transformer_blocks.4.attn.to_add_out.bias"), "transformer_blocks.4.attn.to_add_out.bias"),
    (lambda s: s.pop("txt_norm.weight"), "not those of a Qwen-Image ControlNet"),
], ids=["packing", "channels", "latent", "text", "head", "head-width", "norm", "mlp", "modulation", "time", "outputs", "gap",
        "missing", "signature"])
def test_inconsistent_shapes_raise_checkpoint_error(edit, words):
    shapes = _shapes()
    edit(shapes)
    with pytest.raises(CheckpointError, match=words) as e:
        config_from_shapes(shapes)
    assert ".safetensors" not in str(e.value)  # the loader names the file


def test_config_refuses_impossible_numbers():
    with pytest.raises(ControlNetError, match="multiple of head_dim"):
        QwenControlNetConfig(hidden_size=100, head_dim=64)
    with pytest.raises(ControlNetError, match="axes_dims_rope"):
        QwenControlNetConfig(hidden_size=128, head_dim=64, axes_dims_rope=(8, 28, 30))
    with pytest.raises(ControlNetError, match="fewer than in_channels"):
        QwenControlNetConfig(hint_channels=60)
    with pytest.raises(ControlNetError, match="positive integer"):
        QwenControlNetConfig(num_layers=0)


def test_load_refuses_extra_keys_and_saves_the_same_layout(qwen_files, tmp_path):
    """The format record: a key the shapes do not explain is refused naming the file; save writes the file's own keys."""
    ref, path = qwen_files["inpaint"]
    sd = dict(ref.state_dict())
    bad = save(tmp_path / "extra.safetensors", {**sd, "controlnet_mode_embedder.weight": torch.zeros(4, WIDTH)})
    with pytest.raises(CheckpointError, match="extra.safetensors.*controlnet_mode_embedder"):
        load_ours(bad)
    loaded = FORMAT.load(open_checkpoint(path), LoadOptions())
    assert loaded.format == "qwen-instantx" and FORMAT.kind == "qwen_controlnet" and FORMAT.takes_latent_hint
    out = FORMAT.save(loaded.model, tmp_path / "again.safetensors", None, False)
    again = open_checkpoint(out)
    assert set(again.keys()) == set(sd) and all(torch.equal(again.get(k), sd[k]) for k in sd)
    assert {str(again.stored_dtype(k)) for k in again.keys()} == {"torch.float32"}
    half = FORMAT.save(loaded.model, tmp_path / "half.safetensors", torch.bfloat16, False)
    assert load_ours(half).img_in.weight.dtype == torch.bfloat16


# parity with diffusers


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_diffusers(variant, batch):
    name, ref, path = variant
    ours = load_ours(path)
    x, hint, t, ctx = qwen_inputs(ours.config, batch)
    with torch.no_grad():
        expected = diffusers_outputs(ref, x, hint, t, ctx)
        out = ours(x, hint, t, ctx)
    assert_close(out.blocks, expected)
    assert out.blocks[0].shape == (batch, (8 // 2) * (12 // 2), WIDTH)


def test_odd_token_grid_centring_is_the_only_difference_from_diffusers(qwen_files):
    """5 x 7 tokens (a 10 x 14 latent): diffusers centres odd grids one token lower than ComfyUI does; with its
    centring ours equals diffusers, with ComfyUI's (the default) it does not."""
    ref, path = qwen_files["plain"]
    ours = load_ours(path)
    x, hint, t, ctx = qwen_inputs(ours.config, 2, 10, 14)
    with torch.no_grad():
        expected = diffusers_outputs(ref, x, hint, t, ctx)
        as_diffusers = ours(x, hint, t, ctx, diffusers_centre=True)
        as_comfy = ours(x, hint, t, ctx)
    assert_close(as_diffusers.blocks, expected)
    assert rel_err(as_comfy.blocks[0], expected[0]) > 1e-4
    ids_c, ids_d = position_ids(3, 5, 7), position_ids(3, 5, 7, diffusers_centre=True)
    assert torch.equal(ids_c[:3], ids_d[:3]) and torch.equal(ids_c[:3, 0], torch.tensor([3.0, 4.0, 5.0]))
    assert torch.equal(ids_c[3:, 1:] - 1, ids_d[3:, 1:])
    assert torch.equal(position_ids(3, 4, 6), position_ids(3, 4, 6, diffusers_centre=True))


# parity with ComfyUI


def comfy_qwen(comfy, path, device="cpu", **sizes):
    """ComfyUI's own QwenImageControlNetModel filled from the file (its loader uses the keys as they are), but built
    directly: its loader takes the model's shape from Qwen-Image detection (test_comfy_detection_fixes_width)."""
    import comfy.ldm.qwen_image.controlnet
    import comfy.ops

    src = open_checkpoint(path)
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    model = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(
        extra_condition_channels=cfg.hint_channels - 64, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
        device=device, num_layers=cfg.num_layers, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=CONTEXT_DIM, axes_dims_rope=AXES, image_model="qwen_image", **sizes)
    model.load_state_dict({k: src.get(k) for k in src.keys()}, strict=True)
    return model.eval()


def comfy_control(model, x, hint, t, ctx, **extra) -> dict:
    """ComfyUI's Qwen-Image latents are one-frame video latents: (B, 16, 1, H, W)."""
    out = model(x=x[:, :, None], timesteps=t, context=ctx, hint=hint[:, :, None], **extra)
    return {"input": list(out["input"])}


def test_comfy_detection_fixes_width(comfy, qwen_files):
    """Why the ComfyUI comparisons build its class directly: Qwen-Image detection reads only the latent width and the
    block count; everything else is the class's defaults (24 heads of 128, text width 3584, rotary (16, 56, 56))."""
    import inspect

    import comfy.ldm.qwen_image.model
    import comfy.model_detection

    src = open_checkpoint(qwen_files["union"][1])
    sd = {k: torch.empty(src.shape(k), device="meta") for k in src.keys()}
    assert comfy.model_detection.detect_unet_config(sd, "") == {"image_model": "qwen_image", "in_channels": 64, "num_layers": 5}
    defaults = {k: v.default for k, v in inspect.signature(comfy.ldm.qwen_image.model.QwenImageTransformer2DModel).parameters.items()}
    assert (defaults["num_attention_heads"], defaults["attention_head_dim"], defaults["joint_attention_dim"]) == (24, 128, 3584)
    assert tuple(defaults["axes_dims_rope"]) == (16, 56, 56)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("size", [(8, 12), (10, 14), (7, 9)], ids=["even", "odd-grid", "odd-latent"])
def test_matches_comfy(comfy, qwen_files, name, size):
    """Same file through ComfyUI's class: the same 60-entry `control` list (repeated block-wise); odd token grids
    centred as the host centres them, odd latent sizes padded as it pads, the batch-1 hint shared as it broadcasts."""
    path = qwen_files[name][1]
    ours = load_ours(path)
    theirs = comfy_qwen(comfy, path)
    x, hint, t, ctx = qwen_inputs(ours.config, 2, *size, hint_batch=1)
    with torch.no_grad():
        mine = ours(x[:, :, None], hint[:, :, None], t, ctx).host_control()
        expected = comfy_control(theirs, x, hint.expand(2, -1, -1, -1), t, ctx)
    assert len(mine["input"]) == len(expected["input"]) == COMFY_SLOTS
    assert_close(mine["input"], expected["input"])


def test_union_type_is_not_selected(comfy, qwen_files):
    """The union file has no control-type weights: ComfyUI's class accepts a `control_type` (what
    SetUnionControlNetType sets) and ignores it, so the type is whatever the condition image shows."""
    path = qwen_files["union"][1]
    assert not any("mode" in k or "type" in k or "task" in k for k in open_checkpoint(path).keys())
    theirs = comfy_qwen(comfy, path)
    x, hint, t, ctx = qwen_inputs(load_ours(path).config, 1)
    with torch.no_grad():
        plain = comfy_control(theirs, x, hint, t, ctx)
        typed = comfy_control(theirs, x, hint, t, ctx, control_type=[2])
    assert all(torch.equal(a, b) for a, b in zip(plain["input"], typed["input"]))


# the block rule


class _Pass(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, **kwargs):
        return encoder_hidden_states, hidden_states


@pytest.mark.parametrize("blocks", [1, 2, 5, 6, 7, 13, 60, 61])
def test_host_list_is_comfys(comfy, blocks):
    """Which output fills each slot of ComfyUI's `control` list, read off its own Qwen-Image ControlNet forward at full
    width on the meta device, blocks stubbed out (only its output loop is under test; it never reads values)."""
    import comfy.ldm.qwen_image.controlnet
    import comfy.ops

    net = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(
        num_layers=blocks, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="meta")
    net.transformer_blocks = torch.nn.ModuleList([_Pass() for _ in net.transformer_blocks])
    made = {}
    for i, layer in enumerate(net.controlnet_blocks):
        layer.register_forward_hook(lambda mod, args, out, i=i: made.__setitem__(id(out), i))
    meta = dict(device="meta")
    with torch.no_grad():
        out = net(x=torch.zeros(1, 16, 1, 4, 4, **meta), timesteps=torch.zeros(1, **meta),
                  context=torch.zeros(1, 3, 3584, **meta), hint=torch.zeros(1, 16, 1, 4, 4, **meta))
    assert [made[id(o)] for o in out["input"]] == host_sources(blocks)


def _tagged(n: int, tokens: int, width: int) -> tuple[torch.Tensor, ...]:
    """Control outputs whose every value is their index + 1, so what a base block received can be read back."""
    return tuple(torch.full((1, tokens, width), float(i + 1)) for i in range(n))


def _read_tag(t: torch.Tensor):
    v = t.flatten().unique()
    assert v.numel() == 1
    return None if float(v) == 0 else int(v) - 1


class _Record(torch.nn.Module):
    """A stubbed base block (ComfyUI's and diffusers' call it alike): records the image tokens it receives (the
    previous block's control only, since every stub outputs zeros), then outputs zeros."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def forward(self, hidden_states, encoder_hidden_states, **kwargs):
        self.log.append(hidden_states.clone())
        return torch.zeros_like(encoder_hidden_states), torch.zeros_like(hidden_states)


class _Final(torch.nn.Module):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def forward(self, img, *args, **kwargs):
        self.log.append(img.clone())
        return img


def _received(log: list) -> list:
    """Block k's control arrives as the input of the block after it (or of the final norm)."""
    return [_read_tag(t) for t in log[1:]]


BASES = [(5, 60), (6, 60), (7, 60), (2, 60), (1, 60), (13, 60), (61, 60), (5, 20), (6, 8), (5, 64), (7, 30)]


@pytest.mark.parametrize("n_outputs, base_blocks", BASES)
def test_base_reads_comfys_rule(comfy, n_outputs, base_blocks):
    """ComfyUI's own Qwen-Image base (blocks stubbed) receives, after each block, the output `base_block_sources`
    names, from the list `host_control` gives."""
    import comfy.ldm.qwen_image.model
    import comfy.ops

    rows, cols, text = 2, 3, 3
    base = comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
        num_layers=0, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=8, axes_dims_rope=AXES,
        operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    randomize_(base)
    log = []
    base.transformer_blocks = torch.nn.ModuleList([_Record(log) for _ in range(base_blocks)])
    base.norm_out = _Final(log)
    out = QwenControlOutput(_tagged(n_outputs, rows * cols, WIDTH))
    with torch.no_grad():
        base(torch.zeros(1, 16, 1, 2 * rows, 2 * cols), torch.zeros(1), torch.zeros(1, text, 8), control=out.host_control(),
             transformer_options={})
    received = _received(log)
    assert received == base_block_sources(n_outputs, base_blocks)
    assert [None if t is None else _read_tag(t) for t in out.for_base(base_blocks)] == received


@pytest.mark.parametrize("n_outputs, base_blocks", BASES)
def test_diffusers_rule_and_where_it_differs(n_outputs, base_blocks):
    """diffusers' QwenImageTransformer2DModel (blocks stubbed): `diffusers_block_sources` is what it does; it equals
    ComfyUI's rule on a 60-block base (every Qwen-Image model) and differs on other depths."""
    rows, cols, text = 2, 3, 3
    base = diffusers.QwenImageTransformer2DModel(num_layers=0, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                                 joint_attention_dim=8, axes_dims_rope=AXES)
    randomize_(base).eval()
    log = []
    base.transformer_blocks = torch.nn.ModuleList([_Record(log) for _ in range(base_blocks)])
    base.norm_out = _Final(log)
    with torch.no_grad():
        base(hidden_states=torch.zeros(1, rows * cols, 64), encoder_hidden_states=torch.zeros(1, text, 8), timestep=torch.zeros(1),
             img_shapes=[(1, rows, cols)], controlnet_block_samples=list(_tagged(n_outputs, rows * cols, WIDTH)))
    received = _received(log)
    assert received == diffusers_block_sources(n_outputs, base_blocks)
    assert (received == base_block_sources(n_outputs, base_blocks)) == (base_blocks == 60)


def test_block_rule_examples():
    assert host_sources(5) == [k // 12 for k in range(60)]  # five runs of 12 blocks
    assert host_sources(7)[-1] == 6 and host_sources(7)[:10] == [0] * 9 + [1]  # runs of 9, the last one 6 long
    assert host_sources(0) == []
    assert host_sources(61) == list(range(60))  # output 60 reaches no block
    assert base_block_sources(5, 20) == [0] * 12 + [1] * 8  # ComfyUI on a 20-block base: outputs 2..4 unused
    assert diffusers_block_sources(5, 20) == [k // 4 for k in range(20)]
    assert base_block_sources(5, 64)[60:] == [None] * 4
    assert diffusers_block_sources(0, 3) == [None] * 3


# dtypes, batches, inputs


@pytest.mark.parametrize("name", ["union", "inpaint"])
def test_bfloat16_smoke(qwen_files, name):
    path = qwen_files[name][1]
    ref = load_ours(path)
    ours = load_ours(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    x, hint, t, ctx = qwen_inputs(ours.config, 2)
    with torch.no_grad():
        expected = ref(x, hint, t, ctx)
        out = ours(x.bfloat16(), hint.bfloat16(), t, ctx.bfloat16())
    for a, b in zip(out.blocks, expected.blocks):
        assert a.dtype == torch.bfloat16 and bool(torch.isfinite(a).all())
        assert rel_err(a, b) <= 5e-2


@pytest.mark.parametrize("name", ["plain", "inpaint"])
def test_hint_of_batch_one_is_shared(qwen_files, name):
    ours = load_ours(qwen_files[name][1])
    x, hint, t, ctx = qwen_inputs(ours.config, 2, hint_batch=1)
    with torch.no_grad():
        shared = ours(x, hint, t, ctx)
        expanded = ours(x, hint.expand(2, -1, -1, -1), t, ctx)
        one_t = ours(x, hint, 0.5, ctx)
        two_t = ours(x, hint, torch.tensor([0.5, 0.5]), ctx)
    assert_close(shared.blocks, expanded.blocks, tol=0)
    assert_close(one_t.blocks, two_t.blocks, tol=0)


def test_fp8_stored_weights_load_into_bfloat16(tmp_path):
    """float8_e4m3fn files load computing in bfloat16 (fp8 is a storage format), each weight the fp8 value cast."""
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in diffusers_qwen("plain", seed=2).state_dict().items()}
    ours = load_ours(save(tmp_path / "fp8.safetensors", sd))
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert all(torch.equal(v, sd[k].to(torch.bfloat16)) for k, v in ours.state_dict().items())
    x, hint, t, ctx = qwen_inputs(ours.config, 1)
    with torch.no_grad():
        assert all(bool(torch.isfinite(o).all()) for o in ours(x.bfloat16(), hint.bfloat16(), t, ctx.bfloat16()).blocks)


def test_clear_input_errors(qwen_files):
    inpaint = load_ours(qwen_files["inpaint"][1])
    x, hint, t, ctx = qwen_inputs(inpaint.config, 2)
    latent = hint[:, :16]
    with pytest.raises(ControlNetError, match="append_keep_mask"):
        inpaint(x, latent, t, ctx)
    full = append_keep_mask(latent)
    assert full.shape == (2, 17, 8, 12) and bool((full[:, 16] == 1).all())
    with pytest.raises(ControlNetError, match="latent's size"):
        inpaint(x, hint[..., :4], t, ctx)
    with pytest.raises(ControlNetError, match="a Qwen-Image latent"):
        inpaint(x[:, :4], hint, t, ctx)
    with pytest.raises(ControlNetError, match="one"):
        inpaint(torch.randn(2, 16, 3, 8, 12), hint, t, ctx)
    with pytest.raises(ControlNetError, match="text encoder"):
        inpaint(x, hint, t, ctx[..., :8])
    with pytest.raises(ControlNetError, match="timesteps"):
        inpaint(x, hint, torch.zeros(3), ctx)
    plain = load_ours(qwen_files["plain"][1])
    with pytest.raises(ControlNetError, match="VAE-encoded"):
        plain(x, torch.rand(2, 3, 64, 96), t, ctx)


def test_hint_latent_from_vae_is_the_wan21_latent_format(comfy):
    """ComfyUI's Wan21 `process_in` (its Qwen ControlNet's latent format) and diffusers' Qwen-Image VAE statistics."""
    import inspect

    import comfy.latent_formats

    latent = torch.randn(1, 16, 1, 4, 4)
    assert torch.allclose(hint_latent_from_vae(latent), comfy.latent_formats.Wan21().process_in(latent), atol=1e-6)
    assert torch.allclose(hint_latent_from_vae(latent[:, :, 0]), hint_latent_from_vae(latent)[:, :, 0])
    params = inspect.signature(diffusers.AutoencoderKLQwenImage.__init__).parameters
    mean = torch.tensor(params["latents_mean"].default).view(1, 16, 1, 1)
    std = torch.tensor(params["latents_std"].default).view(1, 16, 1, 1)
    assert torch.allclose(hint_latent_from_vae(latent[:, :, 0]), (latent[:, :, 0] - mean) / std)
    with pytest.raises(ControlNetError, match="Qwen-Image VAE"):
        hint_latent_from_vae(torch.zeros(1, 4, 8, 8))


def test_build_function_gives_the_layout(qwen_files):
    src = open_checkpoint(qwen_files["plain"][1])
    cfg = config_from_shapes({k: src.shape(k) for k in src.keys()})
    model = build_qwen_controlnet(cfg, dtype=torch.float16)
    assert isinstance(model, QwenInstantXControlNet) and model.img_in.weight.dtype == torch.float16
    assert set(model.state_dict()) == set(src.keys())
    assert "2 blocks of width 128" in cfg.summary() and "inpainting" not in cfg.summary()
    assert math.isclose(model.config.num_heads, HEADS)
