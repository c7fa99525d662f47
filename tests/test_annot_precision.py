"""Half-precision annotators: the same maps as float32 within a stated tolerance, selectable on the nodes.

bf16 keeps 8 bits of mantissa, so a soft-edge map in [0, 1] moves by a few 1/255 steps at most where the
sigmoid is steep, and by far less on average; the tolerances below are that, with margin.
"""
from __future__ import annotations

import numpy as np
import pytest
import test_annot_hed as hed_t
import test_annot_pidinet as pidi_t
import torch
from factories import randomize_
from host import Graph

from annotators import hed, lineart, openpose, pidinet


def images() -> torch.Tensor:
    return hed_t.to_tensor([hed_t.photo(s, 128, 192) for s in (1, 2)])


def detectors(tmp_path, kind: str, dtype: torch.dtype):
    if kind == "hed":
        path = tmp_path / "ControlNetHED.pth"
        if not path.exists():
            torch.save(hed_t.random_state_dict(), path)
        return hed.HEDDetector.from_file(path, dtype=dtype)
    if kind == "pidinet":
        path = tmp_path / "table5_pidinet.pth"
        if not path.exists():
            torch.save({"state_dict": {"module." + k: v for k, v in pidi_t.random_state_dict().items()}}, path)
        return pidinet.PiDiNetDetector.from_file(path, dtype=dtype)
    path = tmp_path / "sk_model.pth"
    if not path.exists():
        torch.save(randomize_(lineart.LineartGenerator(), 0).state_dict(), path)
    return lineart.LineartDetector.from_file(path, dtype=dtype)


@pytest.mark.parametrize("kind", ["hed", "pidinet", "lineart"])
def test_bf16_maps_match_float32(tmp_path, kind):
    x = images()
    ref = detectors(tmp_path, kind, torch.float32)(x, resolution=128)
    half = detectors(tmp_path, kind, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    out = half(x, resolution=128)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    diff = (out - ref).abs()
    assert diff.max() > 0  # it really ran in bf16
    assert diff.mean() < 2 / 255, (kind, diff.mean().item())
    assert diff.max() < 0.1, (kind, diff.max().item())


def test_openpose_body_network_in_bf16_gives_the_same_heatmaps(tmp_path):
    net32 = randomize_(openpose.BodyPoseNet(), 0)
    path = tmp_path / "body_pose_model.pth"
    torch.save({k.split(".", 1)[1]: v for k, v in net32.state_dict().items()}, path)
    a = openpose.load_network("body", path, dtype=torch.float32)
    b = openpose.load_network("body", path, dtype=torch.bfloat16)
    assert next(b.parameters()).dtype == torch.bfloat16
    rgb = np.stack([hed_t.photo(3, 128, 128)])
    with torch.inference_mode():
        ya = a(openpose._net_input(rgb, torch.device("cpu"), torch.float32))
        yb = b(openpose._net_input(rgb, torch.device("cpu"), torch.bfloat16))
    for ta, tb in zip(ya, yb):
        scale = ta.abs().max()
        assert ((tb.float() - ta).abs().max() / scale) < 0.05


def test_the_precision_input_runs_the_node_in_bf16(host, monkeypatch):
    from annotators.hed import ControlNetHED

    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")  # random weights, not the published file

    torch.save(randomize_(ControlNetHED(), 0).state_dict(), host.dirs["annotators"] / "ControlNetHED.pth")
    cls = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteAnnotator_hed"]
    assert cls.INPUT_TYPES()["optional"]["precision"][0] == ["fp32", "bf16", "fp16"]
    assert "precision" not in host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteAnnotator_canny"].INPUT_TYPES()["optional"]
    g = Graph()
    img = g.add("SuiteTestImage", width=96, height=64, channels=3, batch=2, seed=0)
    for p in ("fp32", "bf16"):
        n = g.add("ControlNetSuiteAnnotator_hed", image=(img, 0), safe=False, scribble=False, resolution=64, pixel_perfect=False, precision=p)
        g.add("SuiteTestCaptureImage", image=(n, 0), key=p)
    out = host.run(g.prompt)
    diff = (out["bf16"] - out["fp32"]).abs()
    assert out["bf16"].shape == (2, 64, 96, 3)
    assert 0 < diff.max() and diff.mean() < 2 / 255
