"""HED soft edges (annotators/hed.py): official key layout, loading, and parity with controlnet-aux 0.0.10."""
from __future__ import annotations

import math
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
from factories import Draws, photo, to_tensor

from annotators import hed, registry, weights

KEYS = Path(__file__).parent / "data" / "annot_keys" / "annot_hed.tsv"
PARAMS = 14_716_168  # formats.md, section B


def official_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS.read_text().splitlines():
        key, shape = line.split("\t", 1)
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-scaled random weights; the side projections are scaled down so the sigmoid output is not all 0/1."""

    def rule(key: str, draws: Draws):
        if key == "norm":
            return torch.tensor([122.0, 116.0, 104.0]).view(1, 3, 1, 1)
        if key.endswith("projection.weight"):
            return draws.normal() * (0.05 / math.prod(draws.shape[1:]) ** 0.5)
        return None

    return factories.random_state_dict(hed.ControlNetHED(), seed, rule)




@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return random_state_dict()


@pytest.fixture(scope="module")
def weight_file(sd, tmp_path_factory) -> Path:
    # The official ControlNetHED.pth is a flat state dict (no container, no prefix).
    path = tmp_path_factory.mktemp("hed") / hed.FILENAME
    torch.save(sd, path)
    return path


def test_keys_and_shapes_match_official_dump():
    model_sd = hed.ControlNetHED().state_dict()
    assert {k: tuple(v.shape) for k, v in model_sd.items()} == official_shapes()
    assert sum(v.numel() for v in model_sd.values()) == PARAMS


def test_from_file_and_call(weight_file):
    det = hed.HEDDetector.from_file(weight_file)
    assert not any(p.requires_grad for p in det.model.parameters())
    images = torch.rand(2, 3, 72, 100)
    out = det(images, resolution=64)
    assert out.shape == (2, 3, 72, 100)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])

    safe = det(images, resolution=64, safe=True)
    assert safe.shape == out.shape and safe.min() >= 0 and safe.max() <= 1

    scribble = det(images, resolution=64, scribble=True)
    assert scribble.shape == out.shape
    assert set(scribble.unique().tolist()) <= {0.0, 1.0}


def test_registry_builds_from_manifest(weight_file, monkeypatch):
    info = registry.load_all()["hed"]
    assert info.weights == [hed.FILENAME] and hed.FILENAME in weights.MANIFEST
    assert {p.name for p in info.params} == {"resolution", "safe", "scribble"}
    monkeypatch.delenv("CNS_SKIP_HASH_CHECK", raising=False)
    with pytest.raises(weights.AnnotatorWeightsError, match="does not match the published ControlNetHED.pth"):
        registry.load("hed", dirs=[weight_file.parent])  # random weights are not the published file
    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")
    det = registry.load("hed", dirs=[weight_file.parent])
    assert isinstance(det, hed.HEDDetector)


def test_wrong_weight_file_names_the_file(tmp_path):
    from annotators import pidinet

    path = tmp_path / hed.FILENAME
    torch.save({"state_dict": {"module." + k: v for k, v in pidinet.PiDiNet().state_dict().items()}}, path)
    with pytest.raises(weights.AnnotatorWeightsError, match=hed.FILENAME):
        hed.HEDDetector.from_file(path)


def test_parity_with_controlnet_aux(sd):
    aux_hed = pytest.importorskip("controlnet_aux.hed")
    ref_net = aux_hed.ControlNetHED_Apache2()
    ref_net.load_state_dict(sd)
    ref_net.float().eval()
    ref = aux_hed.HEDdetector(ref_net)

    det = hed.HEDDetector(hed.ControlNetHED().eval())
    det.model.load_state_dict(sd)
    # 128 x 192 with resolution 128 is already the detect size: neither side resizes the input.
    imgs = [photo(1, 128, 192), photo(2, 128, 192)]
    x = to_tensor(imgs)
    kw = dict(detect_resolution=128, image_resolution=128, output_type="np")

    ours = det(x, resolution=128)[:, 0].numpy() * 255.0
    theirs = np.stack([ref(i, **kw)[..., 0] for i in imgs]).astype(np.float64)
    assert theirs.std() > 20, "random weights saturated; the comparison would be vacuous"
    # controlnet-aux truncates edge*255 to uint8, we keep the float: ours*255 lies in [ref, ref + 1);
    # 1e-3 covers float32 summation-order differences at the integer boundaries.
    diff = ours - theirs
    assert diff.min() >= -1e-3 and diff.max() < 1 + 1e-3

    # safe_step gives 3 levels; a level can only flip where the float sits on a step boundary.
    ours_safe = det(x, resolution=128, safe=True)[:, 0].numpy() * 255.0
    theirs_safe = np.stack([ref(i, safe=True, **kw)[..., 0] for i in imgs]).astype(np.float64)
    assert (np.abs(ours_safe - theirs_safe) > 1).mean() < 1e-3

    # Fake scribble: same NMS and OpenCV-exact uint8 blur; pixels may only differ where the uint8 map
    # itself differs by one level (float sigmoid vs float64), so allow a handful.
    ours_scr = det(x, resolution=128, scribble=True)[:, 0].numpy() * 255.0
    theirs_scr = np.stack([ref(i, scribble=True, **kw)[..., 0] for i in imgs]).astype(np.float64)
    assert 0.05 < (theirs_scr > 0).mean() < 0.95
    assert (ours_scr != theirs_scr).mean() < 2e-3


def test_fake_scribble_matches_opencv_nms_exactly():
    """Our torch NMS + uint8 blur against controlnet-aux's `nms` + cv2.GaussianBlur on an integer map."""
    util = pytest.importorskip("controlnet_aux.util")
    import cv2

    edge = photo(3, 96, 160)[..., 0]
    ref = util.nms(np.stack([edge] * 3, 2), 127, 3.0)
    ref = cv2.GaussianBlur(ref, (0, 0), 3.0)[..., 0]
    ref = np.where(ref > 4, 255, 0)
    ours = hed.fake_scribble(torch.from_numpy(edge).float()[None, None])[0, 0].numpy() * 255
    assert np.array_equal(ours, ref)
