"""UniFormer-S + UperNet (ADE20K) segmentation annotator: keys, loading, pre/post-processing, cross-checks.

What is cross-checked against code we did not write:
- UperNet decode head and FCN auxiliary head: against `transformers` UperNetHead / UperNetFCNHead (an
  independent port of mmseg's heads), with the same random weights and random BatchNorm statistics.
- UniFormer attention stages and patch embeddings: against `timm` (vision_transformer.Block with the
  non-fused attention path, layers.PatchEmbed), weights copied key for key.
- UniFormer conv stages ("CBlock"): against a functional re-statement of the published block written in
  this file with F.conv2d / F.batch_norm (timm has no such block), so only the wiring is independent.
- Palette: the product copy equals tests/data, spot values from the facts sheet, class i -> palette[i].
- Pre-processing (BGR feed of the reference, mmseg mean/std, test-scale rescale) and post-processing
  (argmax, resize, colouring): hand-computed expectations through a stub network.
What is NOT cross-checked: numbers of the real checkpoint (no weights offline; no ControlNet/mmseg output to
compare with), the official file's container beyond the mmcv {'meta', 'state_dict'} layout rebuilt here,
and the SHA-256 in the manifest (taken from a public source, not recomputed).
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from annotators import registry, weights
from annotators.base import AnnotatorError
from annotators.segmentation import (
    MEAN,
    STD,
    WEIGHTS_FILE,
    FCNHead,
    UniFormer,
    UniformerSegDetector,
    UniformerUperNet,
    UPerHead,
    ade20k_palette,
    colorize_ade20k,
    mmseg_test_size,
)

DATA = Path(__file__).parent / "data" / "annot_keys"
PRODUCT_PALETTE = Path(__file__).parents[1] / "annotators" / "data" / "ade20k_palette_150.json"


def _randomise_norms(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine and running statistics, so a wrong eps / stats mix-up shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(1000)
    return module.eval()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    """Agreement relative to the tensor's scale (fp32 reorderings only)."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"max abs diff {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight file in the official mmcv container layout."""
    torch.manual_seed(0)
    model = _randomise_norms(UniformerUperNet(), seed=1)
    palette = json.loads(PRODUCT_PALETTE.read_text())
    path = tmp_path_factory.mktemp("seg") / WEIGHTS_FILE
    torch.save({"meta": {"CLASSES": tuple(f"class{i}" for i in range(150)), "PALETTE": palette, "mmcv_version": "1.3.0"},
                "state_dict": model.state_dict()}, path)
    return path


# ----------------------------------------------------------------------------------------------- 1. keys


def test_state_dict_matches_official_dump():
    lines = (DATA / "annot_uniformer_upernet_global_small.tsv").read_text().splitlines()
    expected = [tuple(line.split("\t")[:2]) for line in lines if line.strip()]
    sd = UniformerUperNet().state_dict()
    got = [(k, str(tuple(v.shape))) for k, v in sd.items()]
    assert got == expected  # same keys, same shapes, same order
    assert sum(v.numel() for v in sd.values()) == 51_536_775  # the facts sheet's count (all tensors of the file)
    assert sum(p.numel() for p in UniformerUperNet().parameters()) == 51_521_132  # learnable part


# ------------------------------------------------------------------------------------- 2. load and run


def test_from_file_random_checkpoint(checkpoint):
    det = UniformerSegDetector.from_file(checkpoint, net_scale=(256, 64))
    assert not det.model.training and not any(p.requires_grad for p in det.model.parameters())
    calls = []
    det.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    images = torch.rand(2, 3, 72, 96)
    out = det(images, resolution=128)
    assert calls == [torch.Size([2, 3, 64, 96])]  # one batch; detect 128x192 rescaled to short side 64
    assert out.shape == (2, 3, 72, 96) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    pal = ade20k_palette().float() / 255.0
    pixels = out.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert ((pixels - pal[None]).abs().amax(-1) < 1e-6).any(-1).all(), "every pixel must be a palette colour"
    ids = det.classes(images, resolution=128)
    assert ids.shape == (2, 72, 96) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 150
    assert not ids.is_inference() and not out.is_inference()
    assert torch.equal(colorize_ade20k(ids), out)  # same ids: deterministic, and classes() agrees
    with pytest.raises(AnnotatorError, match="resolution"):
        det(images, resolution="512")
    # half precision weights (as on GPUs); a gray image is accepted (base normalisation)
    det.model.to(torch.bfloat16)
    small = det(images[:1, :1, :40, :50], resolution=64)
    assert small.shape == (1, 3, 40, 50) and torch.isfinite(small).all()


def test_registry_entry_and_manifest():
    info = registry.load_all()["seg_uniformer"]
    assert info.weights == [WEIGHTS_FILE] and info.licence == "Apache-2.0"
    assert [p.name for p in info.params] == ["resolution"] and all(p.tooltip for p in info.params)
    spec = weights.MANIFEST[WEIGHTS_FILE]
    assert spec.model == "seg_uniformer" and spec.url.endswith("/lllyasviel/Annotators/resolve/main/upernet_global_small.pth")
    assert spec.sha256 is None or (len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0)


# --------------------------------------------------------------------------------- 4. wrong weight files


def test_wrong_weight_file_names_the_file(tmp_path, checkpoint):
    bad = tmp_path / "not_uniformer.pth"
    torch.save({"state_dict": {"block1.convs.0.weight": torch.zeros(64, 3, 3, 3)}}, bad)
    with pytest.raises(weights.AnnotatorWeightsError, match="not_uniformer.pth") as e:
        UniformerSegDetector.from_file(bad)
    assert "UniFormer" in str(e.value)
    # wrong shapes: the classifier of a Cityscapes (19-class) UperNet
    sd = {"decode_head.conv_seg.weight": torch.zeros(19, 512, 1, 1), "decode_head.conv_seg.bias": torch.zeros(19)}
    city = tmp_path / "upernet_cityscapes.pth"
    torch.save({"meta": {}, "state_dict": sd}, city)
    with pytest.raises(weights.AnnotatorWeightsError, match="upernet_cityscapes.pth.*decode_head.conv_seg"):
        UniformerSegDetector.from_file(city)
    # through the registry, the manifest's SHA-256 rejects a file that is not the published one
    if weights.MANIFEST[WEIGHTS_FILE].sha256:
        with pytest.raises(weights.AnnotatorWeightsError, match=WEIGHTS_FILE):
            registry.load("seg_uniformer", dirs=[checkpoint.parent])


# ------------------------------------------------------------------------------ 3. independent checks


def _hf_key(k: str) -> str:
    return k.replace(".bn.", ".batch_norm.").replace("conv_seg.", "classifier.")


def test_decode_heads_match_transformers_upernet():
    from transformers import UperNetConfig
    from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

    torch.manual_seed(1)
    cfg = UperNetConfig(num_labels=150, hidden_size=512, pool_scales=[1, 2, 3, 6], auxiliary_channels=256,
                        auxiliary_num_convs=1, auxiliary_concat_input=False)
    in_ch = [64, 128, 320, 512]
    ours, theirs = _randomise_norms(UPerHead(), 2), UperNetHead(cfg, in_ch).eval()
    theirs.load_state_dict({_hf_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    aux, aux_ref = _randomise_norms(FCNHead(), 3), UperNetFCNHead(cfg, in_ch, in_index=2).eval()
    aux_ref.load_state_dict({_hf_key(k): v for k, v in aux.state_dict().items()}, strict=True)
    # feature sizes of an 80 x 112 image (strides 4..32, floored): non-integer ratios between levels
    feats = [torch.randn(2, c, h, w) for c, (h, w) in zip(in_ch, [(20, 28), (10, 14), (5, 7), (2, 3)])]
    with torch.no_grad():
        _close(ours(feats), theirs(feats))
        _close(aux(feats), aux_ref(feats))
        # PPM by hand: the scale-1 branch is the global mean, constant over the map
        top = feats[-1]
        branch = ours.psp_modules(top)[0]
        pooled = top.mean((2, 3), keepdim=True)
        m = ours.psp_modules[0][1]
        by_hand = F.relu(F.batch_norm(F.conv2d(pooled, m.conv.weight), m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, False, 0.0, m.bn.eps))
        _close(branch, by_hand.expand_as(branch))


def _ref_conv_block(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    """UniFormer CBlock restated from the paper / official code: x + DWConv3; x + conv2(DWConv5(conv1(BN x))); x + MLP(BN x)."""
    c = x.shape[1]

    def bn(t, n):
        return F.batch_norm(t, sd[n + ".running_mean"], sd[n + ".running_var"], sd[n + ".weight"], sd[n + ".bias"], False, 0.0, 1e-5)

    x = x + F.conv2d(x, sd[p + "pos_embed.weight"], sd[p + "pos_embed.bias"], padding=1, groups=c)
    y = F.conv2d(bn(x, p + "norm1"), sd[p + "conv1.weight"], sd[p + "conv1.bias"])
    y = F.conv2d(y, sd[p + "attn.weight"], sd[p + "attn.bias"], padding=2, groups=c)
    x = x + F.conv2d(y, sd[p + "conv2.weight"], sd[p + "conv2.bias"])
    y = F.gelu(F.conv2d(bn(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
    return x + F.conv2d(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def test_backbone_matches_timm_composition():
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block

    torch.manual_seed(2)
    ours = _randomise_norms(UniFormer(), 4)
    sd = ours.state_dict()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        got = ours(x)
        h = x
        for i, (dim, depth) in enumerate(zip((64, 128, 320, 512), (3, 4, 8, 3)), 1):
            pe = PatchEmbed(img_size=None, patch_size=4 if i == 1 else 2, in_chans=h.shape[1], embed_dim=dim,
                            norm_layer=nn.LayerNorm, strict_img_size=False)
            pe.load_state_dict(_sub(sd, f"patch_embed{i}."), strict=True)
            gh, gw = h.shape[2] // pe.patch_size[0], h.shape[3] // pe.patch_size[1]
            h = pe(h).transpose(1, 2).reshape(1, dim, gh, gw)
            for j in range(depth):
                p = f"blocks{i}.{j}."
                if i <= 2:
                    h = _ref_conv_block(sd, p, h)
                else:
                    h = h + F.conv2d(h, sd[p + "pos_embed.weight"], sd[p + "pos_embed.bias"], padding=1, groups=dim)
                    blk = Block(dim, dim // 64, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
                    blk.attn.fused_attn = False  # explicit softmax(q k^T / sqrt(d)) v
                    blk.load_state_dict({k: v for k, v in _sub(sd, p).items() if not k.startswith("pos_embed.")}, strict=True)
                    h = blk(h.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(h.shape)
            ref = F.layer_norm(h.permute(0, 2, 3, 1), (dim,), sd[f"norm{i}.weight"], sd[f"norm{i}.bias"], 1e-6).permute(0, 3, 1, 2)
            assert got[i - 1].shape == ref.shape == (1, dim, 64 // (2 ** (i + 1)), 96 // (2 ** (i + 1)))
            _close(got[i - 1], ref)


def test_palette_and_colorize():
    product = json.loads(PRODUCT_PALETTE.read_text())
    assert product == json.loads((DATA / "ade20k_palette_150.json").read_text())
    pal = ade20k_palette()
    assert pal.shape == (150, 3) and pal.dtype == torch.uint8
    assert pal[0].tolist() == [120, 120, 120] and pal[1].tolist() == [180, 120, 120] and pal[-1].tolist() == [92, 0, 255]
    ids = torch.arange(150).reshape(1, 10, 15)
    col = colorize_ade20k(ids)
    assert col.shape == (1, 3, 10, 15)
    for i in (0, 1, 2, 77, 149):
        r, c = divmod(i, 15)
        assert (col[0, :, r, c] * 255).round().long().tolist() == product[i]
    assert colorize_ade20k(torch.tensor([[[150, -1]]])).abs().sum() == 0  # out of range: black
    with pytest.raises(AnnotatorError):
        colorize_ade20k(torch.zeros(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(AnnotatorError):
        colorize_ade20k(torch.zeros(1, 4, 4))


class _StubNet(nn.Module):
    """Records its input; logits favour class 3 on the left half of the map and class 7 on the right."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        b, _, h, w = x.shape
        logits = torch.zeros(b, 150, h // 4, w // 4)
        logits[:, 3, :, : w // 8] = 5.0
        logits[:, 7, :, w // 8:] = 5.0
        return logits


def test_pre_and_post_processing_by_hand():
    rgb = torch.tensor([0.2, 0.5, 0.9])
    images = rgb.view(1, 3, 1, 1).expand(2, 3, 72, 96).clone()
    # detect 64x64 (short side 64, multiple of 64), then the mmseg test scale (2048, 512): up to 512 x 512
    for reference, order, scale, size in ((True, [2, 1, 0], (2048, 512), 512), (False, [0, 1, 2], (256, 128), 128)):
        net = _StubNet()
        det = UniformerSegDetector(net, reference_channel_order=reference, net_scale=scale)
        out = det(images, resolution=64)
        (x,) = net.inputs
        assert x.shape == (2, 3, size, size)
        want = (rgb[order] * 255 - torch.tensor(MEAN)) / torch.tensor(STD)
        assert torch.allclose(x[0, :, size // 2, size // 2], want, atol=1e-4), (reference, x[0, :, size // 2, size // 2], want)
        pal = ade20k_palette().float() / 255.0
        # boundary at the middle: left of it class 3, right of it class 7, whole height, both images
        assert torch.equal(out[:, :, :, :44], pal[3].view(1, 3, 1, 1).expand(2, 3, 72, 44))
        assert torch.equal(out[:, :, :, 52:], pal[7].view(1, 3, 1, 1).expand(2, 3, 72, 44))


def test_mmseg_test_scale_by_hand():
    assert mmseg_test_size(512, 512) == (512, 512)
    assert mmseg_test_size(256, 384) == (512, 768)  # upscaled, as mmcv imrescale does
    assert mmseg_test_size(1024, 1536) == (512, 768)
    assert mmseg_test_size(512, 4096) == (256, 2048)  # long side limit 2048 wins
    assert mmseg_test_size(640, 448) == (731, 512)  # int(640 * 512/448 + 0.5)
