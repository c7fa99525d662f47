"""Depth-Anything V2 Small annotator: official key layout, loading, pipeline, and parity with transformers.

No real weights are used: a random state dict with the official keys and shapes (from the key dump)
is written under tmp_path in the official format (a plain state dict saved with torch.save).
"""
import ast
import copy
import inspect
import math
import re
import types
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import Draws

from annotators import depth, registry, weights

DUMP = Path(__file__).parent / "data" / "annot_keys" / "annot_depth_anything_v2_vits.tsv"
PARAMS = 24_785_089


def official_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in DUMP.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")[:2]
            out[key] = tuple(ast.literal_eval(shape))
    return out


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every official key, scaled so activations stay O(1) and the final ReLU lets depth through."""

    def rule(key: str, draws: Draws) -> torch.Tensor:
        r, shape = draws.normal(), draws.shape
        if key.endswith("ls1.gamma") or key.endswith("ls2.gamma"):
            t = 0.3 + 0.1 * r
        elif re.search(r"norm\d?\.weight$", key):
            t = 1.0 + 0.1 * r
        elif key.endswith(("pos_embed", "cls_token", "mask_token")):
            t = 0.5 * r  # large enough that a wrong position-embedding interpolation shows
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = r / math.sqrt(fan_in)
        else:
            t = 0.05 * r
        return t.contiguous()

    sd = factories.random_state_dict(official_shapes(), seed, rule)
    sd["depth_head.scratch.output_conv2.2.bias"] = torch.tensor([0.5])  # keep the last ReLU mostly open
    return sd


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, state_dict):
    path = tmp_path_factory.mktemp("da2") / "depth_anything_v2_vits.pth"
    torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def detector(ckpt):
    return depth.DepthAnythingV2Detector.from_file(ckpt)


def images(b=2, h=60, w=84, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, h // 6, w // 6, generator=g)
    return F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


# 1. layout -----------------------------------------------------------------------------------


def test_keys_and_shapes_equal_the_official_dump():
    sd = depth.DepthAnythingV2().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes()
    assert sum(v.numel() for v in sd.values()) == PARAMS


# 2. loading and running ------------------------------------------------------------------------


def test_from_file_and_call(detector, ckpt):
    m = detector.model
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    x = images(2, 60, 84)
    y = detector(x, resolution=70)
    assert y.shape == (2, 3, 60, 84) and y.dtype == torch.float32
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])  # grey
    for i in range(2):  # min-max per image
        assert y[i].min().item() == 0.0 and y[i].max().item() == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(y[0], y[1])
    # 1-channel and RGBA inputs are normalised by the base class; odd sizes come back unchanged.
    assert detector(x[:1, :1, :59, :83], resolution=70).shape == (1, 3, 59, 83)
    assert detector(torch.cat([x[:1], torch.ones(1, 1, 60, 84)], 1), resolution=70).shape == (1, 3, 60, 84)


def test_chunk_is_one_batch_and_images_are_independent(detector):
    calls = []
    hook = detector.model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        x = images(3, 56, 70, seed=2)
        y = detector(x, resolution=70, chunk_size=8)
        assert calls == [3]
        y1 = detector(x[1:2], resolution=70)
    finally:
        hook.remove()
    torch.testing.assert_close(y[1:2], y1, rtol=0, atol=1e-5)


def test_network_size_matches_the_reference_resize():
    """Depth-Anything's Resize(keep_aspect_ratio, ensure_multiple_of=14, lower_bound), re-done with numpy."""

    def constrain(x, min_val):
        y = (np.round(x / 14) * 14).astype(int)
        if y < min_val:
            y = (np.ceil(x / 14) * 14).astype(int)
        return int(y)

    def reference(h, w, size):
        sh, sw = size / h, size / w
        s = max(sh, sw)
        return constrain(s * h, size), constrain(s * w, size)

    for h, w in [(480, 640), (640, 480), (512, 512), (100, 333), (1080, 1920), (37, 1000), (518, 519)]:
        for size in (518, 512, 505, 70, 98, 140):
            assert depth.network_size(h, w, size) == reference(h, w, size), (h, w, size)
    assert depth.network_size(480, 640, 518) == (518, 686)


def test_preprocess_matches_cv2_bicubic_and_imagenet_norm(detector):
    """The reference resizes the float image with cv2.INTER_CUBIC, then subtracts the ImageNet mean / divides by std."""
    cv2 = pytest.importorskip("cv2")
    x = images(1, 45, 61, seed=3)
    got = detector.preprocess(x, 70)
    nh, nw = depth.network_size(45, 61, 70)
    assert got.shape == (1, 3, nh, nw)
    arr = x[0].permute(1, 2, 0).double().numpy()
    ref = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_CUBIC)
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    ref = torch.from_numpy(ref).permute(2, 0, 1)[None].float()
    # torch and OpenCV share the cubic kernel (a = -0.75) and half-pixel centres; they differ by rounding only.
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)


def test_flat_prediction_gives_black_not_nan(detector):
    model = copy.deepcopy(detector.model)
    model.depth_head.scratch.output_conv2[2].weight.zero_()  # constant disparity everywhere
    y = depth.DepthAnythingV2Detector(model)(images(1, 28, 28), resolution=28)
    assert torch.equal(y, torch.zeros_like(y))


def test_bad_resolution_is_a_clear_error(detector):
    from annotators.base import AnnotatorError

    with pytest.raises(AnnotatorError, match="resolution"):
        detector(images(1, 28, 28), resolution=5)


def test_bfloat16_runs(ckpt):
    det = depth.DepthAnythingV2Detector.from_file(ckpt, dtype=torch.bfloat16)
    assert next(det.model.parameters()).dtype == torch.bfloat16
    y = det(images(1, 42, 56), resolution=42)
    assert y.dtype == torch.float32 and y.shape == (1, 3, 42, 56) and torch.isfinite(y).all()


# 3. parity with transformers ---------------------------------------------------------------------


def to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Depth-Anything V2 keys -> transformers' DepthAnythingForDepthEstimation keys (written out here)."""
    out = {}
    backbone = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in sd.items():
        if k.startswith("pretrained."):
            k = k[len("pretrained."):]
            if k in backbone:
                out["backbone." + backbone[k]] = v
                continue
            i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", k).groups()
            pre = f"backbone.encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[pre + f"attention.{name}.{rest.split('.')[-1]}"] = part
            elif rest in ("ls1.gamma", "ls2.gamma"):
                out[pre + f"layer_scale{rest[2]}.lambda1"] = v
            else:
                mod, param = rest.rsplit(".", 1)
                out[pre + f"{block[mod]}.{param}"] = v
            continue
        k = k[len("depth_head."):]
        if m := re.fullmatch(r"projects\.(\d)\.(\w+)", k):
            out[f"neck.reassemble_stage.layers.{m[1]}.projection.{m[2]}"] = v
        elif m := re.fullmatch(r"resize_layers\.(\d)\.(\w+)", k):
            out[f"neck.reassemble_stage.layers.{m[1]}.resize.{m[2]}"] = v
        elif m := re.fullmatch(r"scratch\.layer(\d)_rn\.weight", k):
            out[f"neck.convs.{int(m[1]) - 1}.weight"] = v
        elif m := re.fullmatch(r"scratch\.refinenet(\d)\.(.+)", k):
            j = 4 - int(m[1])  # transformers runs the fusion layers deepest first: refinenet4 is layers.0
            rest = m[2].replace("out_conv", "projection").replace("resConfUnit", "residual_layer").replace(".conv", ".convolution")
            out[f"neck.fusion_stage.layers.{j}.{rest}"] = v
        else:
            head = {"scratch.output_conv1": "head.conv1", "scratch.output_conv2.0": "head.conv2", "scratch.output_conv2.2": "head.conv3"}
            mod, param = k.rsplit(".", 1)
            out[f"{head[mod]}.{param}"] = v
    return out


def dinov2_pos_encoding(self, embeddings, height, width):
    """DINOv2's own interpolation (scale factor (g + 0.1) / 37), written from the DINOv2 source.

    transformers resizes the table with `size=(g_h, g_w)` instead, which maps coordinates with 37/g rather
    than 37/(g + 0.1): a real, small difference from the released model. To compare everything else
    exactly, the transformers model gets this method; the two interpolations are compared separately below.
    """
    pos = self.position_embeddings.float()
    n = int(round(math.sqrt(pos.shape[1] - 1)))
    gh, gw = height // 14, width // 14
    if gh == n and gw == n:
        return self.position_embeddings
    table = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(table, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic", antialias=False)
    assert table.shape[-2:] == (gh, gw)
    return torch.cat((pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)), dim=1).to(self.position_embeddings.dtype)


def transformers_model(sd):
    tf = pytest.importorskip("transformers")
    backbone = tf.Dinov2Config(
        image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
        layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False,
        out_indices=[3, 6, 9, 12],  # hidden_states[i] is the output of block i-1: blocks 2, 5, 8, 11 as in the original
        apply_layernorm=True, reshape_hidden_states=False,
    )
    cfg = tf.DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=384, reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_in_index=-1, head_hidden_size=32,
        depth_estimation_type="relative", max_depth=1,
    )
    with torch.device("meta"):  # skip the random init of 25M parameters: every tensor comes from `sd`
        model = tf.DepthAnythingForDepthEstimation(cfg)
    missing, unexpected = model.load_state_dict(to_transformers(sd), strict=True, assign=True)
    assert not missing and not unexpected
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.eval()


def test_parity_with_transformers(detector, state_dict):
    hf = transformers_model(state_dict)
    emb = hf.backbone.embeddings
    # The mapped weights are the same tensors: parameter count and every value carried over.
    assert sum(p.numel() for p in hf.parameters()) == PARAMS

    x = detector.preprocess(images(2, 60, 90, seed=4), 84)  # (2, 3, 84, 126): a 6 x 9 patch grid, interpolated positions
    assert x.shape == (2, 3, 84, 126)
    with torch.inference_mode():
        ours = detector.model(x)
        stock = hf(pixel_values=x).predicted_depth
        emb.interpolate_pos_encoding = types.MethodType(dinov2_pos_encoding, emb)
        theirs = hf(pixel_values=x).predicted_depth
    assert ours.shape == theirs.shape == (2, 84, 126)
    assert ours.abs().max() > 0.1  # a real signal, not a dead ReLU
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-4, f"relative error {rel:.2e} against transformers (same position interpolation)"
    # transformers' stock model differs only through the position-embedding resize. With these random
    # weights (position table of std 0.5, 6 x 9 grid) that is large (~0.3 relative); it is why the patch is needed.
    rel_stock = ((ours - stock).abs().max() / stock.abs().max()).item()
    assert rel_stock > 1e-3, rel_stock


def test_position_interpolation_is_dinov2s():
    """Our table equals the DINOv2 formula, differs from a size= resize, and is untouched on the 37 x 37 grid."""
    torch.manual_seed(0)
    net = depth.DinoV2(depth.DepthAnythingV2Config())
    net.pos_embed.data.normal_()
    emb = types.SimpleNamespace(position_embeddings=net.pos_embed.data)
    for gh, gw in [(6, 9), (37, 49), (40, 40), (5, 3)]:
        ours = net.pos_encoding(gh, gw)
        torch.testing.assert_close(ours, dinov2_pos_encoding(emb, None, gh * 14, gw * 14), rtol=0, atol=0)
        table = net.pos_embed.data[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        by_size = F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False)
        assert not torch.allclose(ours[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, gh * gw, -1), atol=1e-3)
    assert net.pos_encoding(37, 37) is net.pos_embed


# 4. wrong files, manifest, registry ----------------------------------------------------------------


def test_wrong_weight_file_names_the_file(tmp_path, state_dict):
    # The transformers-format file (Depth-Anything-V2-Small-hf) is a realistic mix-up.
    wrong = tmp_path / "model.pth"
    torch.save(to_transformers(state_dict), wrong)
    with pytest.raises(weights.AnnotatorWeightsError, match=re.escape(str(wrong))) as e:
        depth.DepthAnythingV2Detector.from_file(wrong)
    assert "Depth-Anything-V2-Small" in str(e.value)

    # Same keys, one wrong shape (as a Base checkpoint would have): named in the message.
    sd = dict(state_dict)
    sd["pretrained.norm.weight"] = torch.ones(768)
    bad = tmp_path / "depth_anything_v2_vitb.pth"
    torch.save(sd, bad)
    with pytest.raises(weights.AnnotatorWeightsError, match="pretrained.norm.weight") as e:
        depth.DepthAnythingV2Detector.from_file(bad)
    assert str(bad) in str(e.value)

    # Not a weight file at all (a saved login page): the same error class, naming the file.
    page = tmp_path / "depth_anything_v2_vits.pth"
    page.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(weights.AnnotatorWeightsError, match=re.escape(str(page))):
        depth.DepthAnythingV2Detector.from_file(page)


def test_manifest_and_registry(tmp_path, ckpt):
    spec = weights.MANIFEST["depth_anything_v2_vits.pth"]
    assert spec.licence == "Apache-2.0" and spec.model == "depth_anything_v2"
    assert spec.url == "https://huggingface.co/depth-anything/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth"
    assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)

    info = registry.load_all()["depth_anything_v2"]
    assert info.weights == ["depth_anything_v2_vits.pth"] and info.licence == "Apache-2.0"
    keywords = {n for n, p in inspect.signature(depth.DepthAnythingV2Detector.annotate).parameters.items()
                if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty}
    assert {p.name for p in info.params} == keywords and all(p.tooltip for p in info.params)

    det = info.build({"depth_anything_v2_vits.pth": ckpt}, device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(det, depth.DepthAnythingV2Detector)

    # Random weights under the official name fail the published hash when looked up through the registry.
    if spec.sha256 is not None:
        (tmp_path / spec.filename).write_bytes(ckpt.read_bytes())
        with pytest.raises(weights.AnnotatorWeightsError, match="SHA-256"):
            registry.load("depth_anything_v2", dirs=[tmp_path])
