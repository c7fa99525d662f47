"""M-LSD annotator: official key layout, loading from the official container, parity with controlnet-aux 0.0.10.

Random weights only (nothing is downloaded): the checkpoints are built here in the official format,
a flat `torch.save(model.state_dict())` OrderedDict including the BatchNorm `num_batches_tracked` counters.
"""
import inspect
from collections import OrderedDict
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
from factories import Draws
from torch import nn

from annotators import registry, weights
from annotators.mlsd import LARGE_FILE, TINY_FILE, MLSDDetector, TinyMLSDDetector, to_network_input

KEYS = Path(__file__).parent / "data" / "annot_keys"
VARIANTS = {
    # variant: (our detector, key dump, parameter count from reference/formats.md B)
    "large": (MLSDDetector, "annot_mlsd_large.tsv", 1_533_680),
    "tiny": (TinyMLSDDetector, "annot_mlsd_tiny.tsv", 620_208),  # formats.md: "tiny 620k"
}


def read_dump(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def random_state_dict(module: nn.Module, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Random weights that keep activations in a sane range through 20+ BatchNorm layers (He-scaled convs,
    BN statistics near identity), so the TP map has real peaks and the decoder has work to do."""

    def rule(key: str, draws: Draws):
        if key.endswith("num_batches_tracked"):
            return torch.tensor(12345, dtype=torch.int64)
        if key.endswith("running_var") or (len(draws.shape) == 1 and not key.endswith(("running_mean", "bias"))):
            return draws.uniform() + 0.5  # BatchNorm variances and weights
        return None  # conv weights He-scaled, means and biases 0.1 * N(0, 1)

    sd = OrderedDict(factories.random_state_dict(module, seed, rule))
    # The head's last 1x1 conv sets the TP-map scale: shrink it so displacements are a few to a few tens
    # of pixels (segments mostly inside the image, as with trained weights) instead of hundreds.
    for key in sd:
        if key.endswith("conv3.weight"):
            sd[key] *= 0.05
    return sd


def make_images(height: int = 64, width: int = 128, n: int = 2) -> np.ndarray:
    """uint8 (n, H, W, 3): rectangles and lines on a gradient, so that /255 then *255 is exact."""
    import cv2

    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        img = np.zeros((height, width, 3), np.uint8)
        img[:] = np.linspace(20, 200, width, dtype=np.uint8)[None, :, None]
        for _ in range(6):
            x1, x2 = sorted(rng.integers(0, width, 2))
            y1, y2 = sorted(rng.integers(0, height, 2))
            cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
        for _ in range(4):
            p = rng.integers(0, [width, height, width, height])
            cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), (255, 255, 255), 2)
        out.append(img)
    return np.stack(out)


def as_batch(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0


def save_checkpoint(tmp_path: Path, variant: str, seed: int = 0) -> tuple[Path, "OrderedDict[str, torch.Tensor]"]:
    cls = VARIANTS[variant][0]
    sd = random_state_dict(cls.network(), seed)
    path = tmp_path / (LARGE_FILE if variant == "large" else TINY_FILE)
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keys_match_official_dump(variant):
    cls, dump, n_params = VARIANTS[variant]
    model = cls.network()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_dump(dump)
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_from_file_and_call(tmp_path, variant):
    path, _ = save_checkpoint(tmp_path, variant)
    det = VARIANTS[variant][0].from_file(path)
    assert not any(p.requires_grad for p in det.model.parameters()) and not det.model.training
    images = torch.rand(2, 3, 50, 75)  # not a multiple of 64: detect size 64x128, drawn back at 50x75
    out = det(images, resolution=64)
    assert out.shape == (2, 3, 50, 75) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert out.sum() > 0  # random weights do produce lines at the default thresholds
    # a centre score is a sigmoid, so a threshold above 1 keeps nothing
    assert det(images, resolution=64, value_threshold=1.5).sum() == 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loading_folds_every_batch_norm_into_its_convolution(tmp_path, variant):
    """The loaded network has no BatchNorm left and computes what the checkpoint's unfolded network computes."""
    path, sd = save_checkpoint(tmp_path, variant, seed=5)
    det = VARIANTS[variant][0].from_file(path)
    unfolded = VARIANTS[variant][0].network()
    unfolded.load_state_dict(sd)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules())
    assert n_bn > 20 and not any(isinstance(m, nn.BatchNorm2d) for m in det.model.modules())
    x = to_network_input(torch.rand(1, 3, 64, 128))
    with torch.inference_mode():
        want, got = unfolded.eval()(x), det.model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bfloat16_runs(tmp_path):
    path, _ = save_checkpoint(tmp_path, "tiny")
    det = TinyMLSDDetector.from_file(path, dtype=torch.bfloat16)
    out = det(torch.rand(1, 3, 64, 64), resolution=64)
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()


class Recorder(nn.Module):
    """Wraps the reference network to keep the TP map that controlnet-aux's pred_lines computes internally."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        self.outputs.append(y)
        return y


def sort_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])] if len(a) else a.reshape(0, 4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_controlnet_aux(tmp_path, variant):
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.mlsd.models.mbv2_mlsd_tiny import MobileV2_MLSD_Tiny
    from controlnet_aux.mlsd.utils import pred_lines

    path, sd = save_checkpoint(tmp_path, variant, seed=3)
    det = VARIANTS[variant][0].from_file(path)
    ref_net = MobileV2_MLSD_Large() if variant == "large" else MobileV2_MLSD_Tiny()
    ref_net.load_state_dict(sd, strict=True)
    ref = Recorder(ref_net.eval())

    # 64x128 at resolution 64 is already the detect size: neither side resizes, so the comparison
    # isolates normalisation, network, decoding and drawing.
    images = make_images()
    batch = as_batch(images)
    thr_v, thr_d = 0.1, 0.1

    with torch.inference_mode():
        ours_tp = det.model(to_network_input(batch))
    ours_segments = det.segments(batch, resolution=64, value_threshold=thr_v, distance_threshold=thr_d)
    ours_maps = (det(batch, resolution=64, value_threshold=thr_v, distance_threshold=thr_d)[:, 0] * 255).round().to(torch.uint8).numpy()

    for i, img in enumerate(images):
        with torch.no_grad():
            ref_lines = pred_lines(img, ref, [img.shape[0], img.shape[1]], thr_v, thr_d)
            ref_map = MLSDdetector(ref)(img, thr_v, thr_d, detect_resolution=64, image_resolution=64, output_type="np")[:, :, 0]
        ref_tp = ref.outputs[0]
        ref.outputs.clear()

        # 1. Raw TP map: same float32 maths, batch of 2 vs batch of 1; only summation order may differ.
        assert ours_tp.shape[1:] == ref_tp.shape[1:]
        torch.testing.assert_close(ours_tp[i : i + 1], ref_tp, atol=1e-4, rtol=1e-4)

        # 2. Segments (detect-size pixels; equal to input pixels here). A rounding-level difference in the
        # map may flip a near-tie in the 3x3 NMS or the top-200 cut, so allow 2% of segments to differ;
        # the matched ones must agree to 1e-3 px.
        ours_s, ref_s = sort_rows(ours_segments[i]), sort_rows(np.asarray(ref_lines, dtype=np.float64))
        assert len(ref_s) > 20, "random weights should give plenty of lines"
        assert abs(len(ours_s) - len(ref_s)) <= 0.02 * len(ref_s)
        dist = np.abs(ours_s[:, None, :] - ref_s[None, :, :]).max(-1)  # (ours, ref)
        matched = (dist.min(0) < 1e-3).mean()
        assert matched >= 0.98, f"only {matched:.1%} of the reference segments are reproduced"

        # 3. Drawn map: white 1-px lines, compared as sets of line pixels. int() truncation can move an
        # endpoint by a pixel when a coordinate sits on an integer boundary, hence IoU, not equality.
        assert ref_map.any() and set(np.unique(ours_maps[i]).tolist()) <= {0, 255}
        a, b = ours_maps[i] > 0, ref_map > 0
        iou = (a & b).sum() / (a | b).sum()
        assert iou >= 0.97, f"line-pixel IoU {iou:.3f}"


def test_wrong_weight_file(tmp_path):
    from annotators.lineart import LineartGenerator

    wrong = tmp_path / "not_mlsd.pth"
    torch.save(LineartGenerator().state_dict(), wrong)
    with pytest.raises(weights.AnnotatorWeightsError, match="not_mlsd.pth"):
        MLSDDetector.from_file(wrong)
    # the two M-LSD sizes are not interchangeable either
    large, _ = save_checkpoint(tmp_path, "large")
    with pytest.raises(weights.AnnotatorWeightsError, match=LARGE_FILE):
        TinyMLSDDetector.from_file(large)


def test_registered(tmp_path):
    params = inspect.signature(MLSDDetector.annotate).parameters
    for key, file, cls in (("mlsd", LARGE_FILE, MLSDDetector), ("mlsd_tiny", TINY_FILE, TinyMLSDDetector)):
        info = registry.ANNOTATORS[key]
        assert info.weights == [file] and info.licence == "Apache-2.0"
        assert [p.name for p in info.params] == [n for n in params if n not in ("self", "images")]
        assert all(p.default == params[p.name].default and p.tooltip for p in info.params)
        spec = weights.MANIFEST[file]
        assert spec.model == key and spec.licence == "Apache-2.0"
        assert spec.sha256 is None or len(spec.sha256) == 64
        path, _ = save_checkpoint(tmp_path, "large" if key == "mlsd" else "tiny")
        det = info.build({file: path}, device=torch.device("cpu"), dtype=torch.float32)
        assert type(det) is cls and det.name == key
