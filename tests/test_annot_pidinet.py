"""PiDiNet soft edges (annotators/pidinet.py): official key layout, loading, converted pixel-difference
convolutions, and parity with controlnet-aux 0.0.10 (which runs the unconverted network)."""
from __future__ import annotations

from pathlib import Path

import factories
import numpy as np
import pytest
import torch
from factories import Draws, photo, to_tensor

from annotators import pidinet, registry, weights

KEYS = Path(__file__).parent / "data" / "annot_keys" / "annot_pidinet.tsv"
PARAMS = 710_149  # formats.md, section B


def official_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS.read_text().splitlines():
        key, shape = line.split("\t", 1)
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-scaled random weights, tamed so the comparison is well conditioned.

    The residual branches are scaled down (plain He init doubles the variance at each of the 15 residual blocks,
    and the huge logits then differ by ~1e-3 between any two float32 implementations); the map-reduce convs
    are scaled up so the fused sigmoid spreads over (0, 1).
    """

    def rule(key: str, draws: Draws):
        if len(draws.shape) == 4 and key.startswith("block") and ".conv2." in key:
            return draws.he() * 0.3
        if len(draws.shape) == 4 and key.startswith("conv_reduces"):
            return draws.he() * 3.0
        return None

    return factories.random_state_dict(pidinet.PiDiNet(), seed, rule)




@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return random_state_dict()


@pytest.fixture(scope="module")
def weight_file(sd, tmp_path_factory) -> Path:
    # The official container: {'state_dict': {'module.' + key: tensor}} from DataParallel training.
    path = tmp_path_factory.mktemp("pidinet") / pidinet.FILENAME
    torch.save({"epoch": 14, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return path


def test_keys_and_shapes_match_official_dump():
    model_sd = pidinet.PiDiNet().state_dict()
    assert {k: tuple(v.shape) for k, v in model_sd.items()} == official_shapes()
    assert sum(v.numel() for v in model_sd.values()) == PARAMS


@pytest.mark.parametrize("kind", ["cv", "cd", "ad", "rd"])
@pytest.mark.parametrize("groups", [1, 6])
def test_converted_conv_equals_pixel_difference_conv(kind, groups):
    """The vanilla kernel computes exactly the reference's on-the-fly pixel-difference convolution."""
    model = pytest.importorskip("controlnet_aux.pidi.model")
    conv = pidinet.PixelDifferenceConv(kind, 6, 12, groups=groups)
    x = torch.randn(2, 6, 17, 23)
    ref = model.createConvFunc(kind)(x, conv.weight, None, 1, 1, 1, groups)
    # float32, different summation order only
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_from_file_and_call(weight_file):
    det = pidinet.PiDiNetDetector.from_file(weight_file)
    assert not any(p.requires_grad for p in det.model.parameters())
    images = torch.rand(2, 3, 72, 100)
    out = det(images, resolution=64)
    assert out.shape == (2, 3, 72, 100)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[:, 0], out[:, 2])
    safe = det(images, resolution=64, safe=True)
    assert safe.shape == out.shape and safe.min() >= 0 and safe.max() <= 1


def test_registry_builds_from_manifest(weight_file, monkeypatch):
    info = registry.load_all()["pidinet"]
    assert info.weights == [pidinet.FILENAME] and pidinet.FILENAME in weights.MANIFEST
    assert {p.name for p in info.params} == {"resolution", "safe"}
    monkeypatch.delenv("CNS_SKIP_HASH_CHECK", raising=False)
    with pytest.raises(weights.AnnotatorWeightsError, match="does not match the published table5_pidinet.pth"):
        registry.load("pidinet", dirs=[weight_file.parent])  # random weights are not the published file
    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")
    assert isinstance(registry.load("pidinet", dirs=[weight_file.parent]), pidinet.PiDiNetDetector)


def test_wrong_weight_file_names_the_file(tmp_path):
    from annotators import hed

    path = tmp_path / pidinet.FILENAME
    torch.save(hed.ControlNetHED().state_dict(), path)
    with pytest.raises(weights.AnnotatorWeightsError, match=pidinet.FILENAME):
        pidinet.PiDiNetDetector.from_file(path)


def test_parity_with_controlnet_aux(sd):
    aux = pytest.importorskip("controlnet_aux.pidi")
    ref_net = aux.model.pidinet()  # unconverted pixel-difference convolutions
    ref_net.load_state_dict(sd)
    ref_net.eval()
    ref = aux.PidiNetDetector(ref_net)

    det = pidinet.PiDiNetDetector(pidinet.PiDiNet().eval())
    det.model.load_state_dict(sd)
    # 128 x 128 with resolution 128 is already the detect size: neither side resizes the input.
    imgs = [photo(1, 128, 128), photo(2, 128, 128)]
    x = to_tensor(imgs)
    kw = dict(detect_resolution=128, image_resolution=128, output_type="np")

    ours = det(x, resolution=128)[:, 0].numpy() * 255.0
    theirs = np.stack([ref(i, **kw)[..., 0] for i in imgs]).astype(np.float64)
    assert theirs.std() > 20, "random weights saturated; the comparison would be vacuous"
    # controlnet-aux truncates edge*255 to uint8, we keep the float: ours*255 lies in [ref, ref + 1);
    # 1e-3 covers float32 summation-order differences (converted vs on-the-fly convs) at integer boundaries.
    diff = ours - theirs
    assert diff.min() >= -1e-3 and diff.max() < 1 + 1e-3

    # safe_step gives 3 levels; a level can only flip where the float sits on a step boundary.
    ours_safe = det(x, resolution=128, safe=True)[:, 0].numpy() * 255.0
    theirs_safe = np.stack([ref(i, safe=True, **kw)[..., 0] for i in imgs]).astype(np.float64)
    assert len(np.unique(theirs_safe)) > 1
    assert (np.abs(ours_safe - theirs_safe) > 1).mean() < 1e-3
