"""Realistic line art (fine / coarse): official key layout, loading, parity with controlnet-aux 0.0.10.

Random weights only (nothing is downloaded). The official `sk_model.pth` / `sk_model2.pth` are flat
`torch.save(Generator(3, 1, 3).state_dict())` dicts, which is what the tests write.
"""
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from annotators import registry, weights
from annotators.lineart import COARSE_FILE, FINE_FILE, CoarseLineartDetector, LineartDetector, LineartGenerator

DUMP = Path(__file__).parent / "data" / "annot_keys" / "annot_lineart.tsv"
N_PARAMS = 4_290_945  # reference/formats.md section B
DETECTORS = {"lineart": (LineartDetector, FINE_FILE), "lineart_coarse": (CoarseLineartDetector, COARSE_FILE)}


def read_dump() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in DUMP.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def save_checkpoint(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default init is fine here: instance norms keep every layer in range."""
    torch.manual_seed(seed)
    sd = LineartGenerator().state_dict()
    torch.save(sd, path)
    return sd


def make_images(height: int = 64, width: int = 64, n: int = 2) -> np.ndarray:
    """uint8 (n, H, W, 3) with edges (random blocks on a gradient), so /255 then *255 is exact."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        img = np.zeros((height, width, 3), np.uint8)
        img[:] = np.linspace(30, 220, width, dtype=np.uint8)[None, :, None]
        for _ in range(5):
            y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
            img[y : y + rng.integers(4, 24), x : x + rng.integers(4, 24)] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(img)
    return np.stack(out)


def test_keys_match_official_dump():
    model = LineartGenerator()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == read_dump()
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS


@pytest.mark.parametrize("key", sorted(DETECTORS))
def test_from_file_and_call(tmp_path, key):
    cls, file = DETECTORS[key]
    save_checkpoint(tmp_path / file, seed=1)
    det = cls.from_file(tmp_path / file)
    assert det.name == key and not det.model.training
    assert not any(p.requires_grad for p in det.model.parameters())
    images = torch.rand(2, 3, 40, 50)  # not a multiple of 64: detect size 64x64, resized back to 40x50
    out = det(images, resolution=64)
    assert out.shape == (2, 3, 40, 50) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert out.std() > 0
    # one batch through the network equals image by image (no cross-talk through the instance norms)
    torch.testing.assert_close(det(images[1:], resolution=64), out[1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("coarse", [False, True])
def test_parity_with_controlnet_aux(tmp_path, coarse):
    from controlnet_aux.lineart import Generator
    from controlnet_aux.lineart import LineartDetector as RefDetector

    cls, file = DETECTORS["lineart_coarse" if coarse else "lineart"]
    sd = save_checkpoint(tmp_path / file, seed=5 if coarse else 4)
    det = cls.from_file(tmp_path / file)
    ref_net = Generator(3, 1, 3)
    ref_net.load_state_dict(sd, strict=True)
    ref_net.eval()
    # the reference picks the network by `coarse`; give it ours in that slot and a decoy in the other
    decoy = Generator(3, 1, 3).eval()
    ref = RefDetector(decoy, ref_net) if coarse else RefDetector(ref_net, decoy)
    # keep both raw network outputs (forward hooks) so the network is compared tightly without extra passes
    ours_raw, ref_raw = [], []
    det.model.register_forward_hook(lambda m, i, o: ours_raw.append(o))
    ref_net.register_forward_hook(lambda m, i, o: ref_raw.append(o))

    # 64x64 at resolution 64 is already the detect size: neither side resizes, so this isolates
    # colour order, normalisation, network and the inversion.
    images = make_images()
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    out = det(batch, resolution=64, chunk_size=2)
    assert len(ours_raw) == 1 and ours_raw[0].shape == (2, 1, 64, 64)  # one batched pass
    assert torch.allclose(det(batch, resolution=64), out, atol=1e-5)  # the CPU default, one image per pass: the same maps
    assert [o.shape[0] for o in ours_raw[1:]] == [1, 1]

    for i, img in enumerate(images):
        expected = ref(img, coarse=coarse, detect_resolution=64, image_resolution=64, output_type="np")
        # 1. network: same float32 maths on the same input, batch of 2 vs 1 (summation order only)
        torch.testing.assert_close(ours_raw[0][i : i + 1], ref_raw[i], atol=1e-5, rtol=0)
        # 2. full pipeline: the reference stores uint8(line*255) (truncation) and returns 255 minus it,
        # so its value v satisfies ours*255 in [v - 1, v]: tolerance 1/255 plus float slack.
        assert expected.shape == (64, 64, 3) and expected.std() > 0
        got = out[i].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, expected / 255.0, atol=1 / 255 + 1e-4, rtol=0)


def test_wrong_weight_file(tmp_path):
    from annotators.mlsd import MLSDLarge

    wrong = tmp_path / "mlsd_as_lineart.pth"
    torch.save(MLSDLarge().state_dict(), wrong)
    for cls in (LineartDetector, CoarseLineartDetector):
        with pytest.raises(weights.AnnotatorWeightsError, match="mlsd_as_lineart.pth"):
            cls.from_file(wrong)
    # a truncated generator (2 residual blocks instead of 3) is refused too
    short = tmp_path / "short.pth"
    torch.save(LineartGenerator(residual_blocks=2).state_dict(), short)
    with pytest.raises(weights.AnnotatorWeightsError, match="short.pth"):
        LineartDetector.from_file(short)


def test_registered(tmp_path):
    params = inspect.signature(LineartDetector.annotate).parameters
    for key, (cls, file) in DETECTORS.items():
        info = registry.ANNOTATORS[key]
        assert info.weights == [file] and info.licence == "MIT"
        assert [p.name for p in info.params] == [n for n in params if n not in ("self", "images")]
        assert all(p.default == params[p.name].default and p.tooltip for p in info.params)
        spec = weights.MANIFEST[file]
        assert spec.model == key and spec.licence == "MIT" and spec.url.endswith("/" + file)
        save_checkpoint(tmp_path / file, seed=2)
        det = info.build({file: tmp_path / file}, device=torch.device("cpu"), dtype=torch.float32)
        assert type(det) is cls


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("chunk", [1 << 20, 16 * 7])  # one chunk of squares, or 7 pixels at a time (69 chunks)
def test_instance_norm_equals_torchs(channels_last, chunk, monkeypatch):
    from annotators.lineart import InstanceNorm

    monkeypatch.setattr(InstanceNorm, "SQUARES_CHUNK", chunk)
    x = torch.randn(2, 16, 24, 20) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, ref = InstanceNorm(16)(x), torch.nn.InstanceNorm2d(16)(x)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert ours.is_contiguous(memory_format=torch.channels_last) == channels_last  # the layout is kept
    half = InstanceNorm(16)(x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), ref, atol=0.05)
