"""Annotator nodes inside the real ComfyUI: generated per annotator, batched, pixel-perfect, clear weight errors."""
import pytest
import torch
from host import Graph, PromptFailed


def image_graph(w=96, h=64, batch=3, channels=3):
    g = Graph()
    img = g.add("SuiteTestImage", width=w, height=h, channels=channels, batch=batch, seed=0)
    return g, (img, 0)


def test_every_registered_annotator_has_a_node_with_tooltips(host):
    from annotators import registry

    M = host.nodes.NODE_CLASS_MAPPINGS
    keys = set(registry.load_all())
    assert {"canny", "hough_lines", "scribble_xdog", "lineart_standard", "shuffle", "tile", "normal_from_depth", "seg_colors"} <= keys
    for k in keys:
        cls = M[f"ControlNetSuiteAnnotator_{k}"]
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("image/preprocessors")
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                assert spec[1].get("tooltip"), (k, name)
    assert "ControlNetSuiteAnyAnnotator" in M and "ControlNetSuiteInpaintHint" in M
    assert not registry.FAILED or set(registry.FAILED.values()) == {"not installed"}, registry.FAILED


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_canny_node_keeps_the_batch_and_uses_the_detect_resolution(host, channels):
    g, img = image_graph(channels=channels)
    n = g.add("ControlNetSuiteAnnotator_canny", image=img, low_threshold=50, high_threshold=100, resolution=128, pixel_perfect=False)
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    out = host.run(g.prompt)["img"]
    assert out.shape == (3, 128, 192, 3) and out.min() >= 0 and out.max() <= 1


def test_pixel_perfect_matches_the_target_latent(host):
    g, img = image_graph(w=300, h=200, batch=2)
    lat = g.add("EmptyLatentImage", width=96, height=64, batch_size=2)
    n = g.add("ControlNetSuiteAnnotator_lineart_standard", image=img, gaussian_sigma=6.0, intensity_threshold=8, resolution=512,
              pixel_perfect=True, target_latent=(lat, 0))
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    assert host.run(g.prompt)["img"].shape == (2, 64, 96, 3)


def test_any_annotator_node_and_inpaint_hint(host):
    g, img = image_graph(batch=2)
    a = g.add("ControlNetSuiteAnyAnnotator", image=img, annotator="tile", resolution=64, pixel_perfect=True)
    mask = g.add("SolidMask", value=1.0, width=32, height=32)
    ip = g.add("ControlNetSuiteInpaintHint", image=img, mask=(mask, 0))
    g.add("SuiteTestCaptureImage", image=(a, 0), key="any")
    g.add("SuiteTestCaptureImage", image=(ip, 0), key="inpaint")
    out = host.run(g.prompt)
    assert out["any"].shape == (2, 64, 96, 3)
    assert (out["inpaint"] == -1).all()


def test_missing_neural_weights_name_the_file_the_folder_and_the_command(host):
    from annotators import registry

    info = registry.load_all()["depth_anything_v2"]
    g, img = image_graph(batch=1)
    cls = host.nodes.NODE_CLASS_MAPPINGS[f"ControlNetSuiteAnnotator_{info.key}"]
    kw = {name: spec[1]["default"] for name, spec in cls.INPUT_TYPES()["required"].items() if name != "image"}
    n = g.add(f"ControlNetSuiteAnnotator_{info.key}", image=img, **kw)
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    with pytest.raises(PromptFailed) as e:
        host.run(g.prompt)
    msg = str(e.value)
    assert info.weights[0] in msg and str(host.dirs["annotators"]) in msg and "python -m annotators fetch" in msg


def test_weight_file_with_the_wrong_hash_is_refused(host, tmp_path):
    from annotators import weights

    spec = weights.WeightFile("fake_model.pth", "https://example.invalid/fake_model.pth", "0" * 64, 10, "none", "fake")
    weights.register(spec)
    (host.dirs["annotators"] / "fake_model.pth").write_bytes(b"not the real file")
    with pytest.raises(weights.AnnotatorWeightsError, match="does not match"):
        weights.find("fake_model.pth", [host.dirs["annotators"]])


def test_a_neural_annotator_node_runs_with_weights_from_the_annotators_folder(host, monkeypatch):
    """HED with random weights in the official layout, found in ComfyUI's 'annotators' folder, run as a node.

    Random weights are not the published file: by default the node refuses them by their SHA-256, naming the
    file and the way out; with CNS_SKIP_HASH_CHECK=1 (a user's own re-saved weights) it runs them."""
    from factories import randomize_

    from annotators.hed import ControlNetHED

    torch.save(randomize_(ControlNetHED(), 0).state_dict(), host.dirs["annotators"] / "ControlNetHED.pth")
    g, img = image_graph(w=80, h=64, batch=3)
    n = g.add("ControlNetSuiteAnnotator_hed", image=img, safe=False, scribble=False, resolution=64, pixel_perfect=False)
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    monkeypatch.delenv("CNS_SKIP_HASH_CHECK", raising=False)
    with pytest.raises(Exception, match=r"ControlNetHED\.pth: SHA-256 [0-9a-f]{16}\.\.\. does not match the published.*CNS_SKIP_HASH_CHECK=1"):
        host.run(g.prompt)
    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")
    out = host.run(g.prompt)["img"]
    assert out.shape == (3, 64, 80, 3) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("node, setting", [("lineart_standard", {"gaussian_sigma": float("nan"), "intensity_threshold": 8}),
                                           ("tile", {"pyramid_levels": 1, "blur_sigma": float("nan")})])
def test_nan_settings_are_refused_with_their_name(host, node, setting):
    """NaN passes ComfyUI's min/max checks: it used to fail inside OpenCV (lineart) or run unnoticed (tile)."""
    g, img = image_graph()
    n = g.add(f"ControlNetSuiteAnnotator_{node}", image=img, resolution=64, pixel_perfect=False, **setting)
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    name = next(k for k, v in setting.items() if v != v)
    with pytest.raises(PromptFailed, match=rf"{name} is nan; every setting must be a finite number"):
        host.run(g.prompt)


@pytest.mark.parametrize("w, h, resolution", [(3000, 1, 512), (64, 64, 16384)])
def test_detect_sizes_beyond_the_megapixel_limit_are_refused_before_any_allocation(host, w, h, resolution):
    """A 3000x1 image at resolution 512 would be detected at 1,536,000 x 512 px (9.4 GB as float RGB); resolution 16384
    asks 268 megapixels for one image. Refused with the sizes, the limit and what to change, not an OOM kill."""
    g, img = image_graph(w=w, h=h, batch=1)
    n = g.add("ControlNetSuiteAnnotator_canny", image=img, low_threshold=50, high_threshold=100, resolution=resolution, pixel_perfect=False)
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    with pytest.raises(PromptFailed) as e:
        host.run(g.prompt)
    msg = str(e.value)
    assert f"a {w}x{h} image at resolution {resolution}" in msg and "megapixels per image" in msg and "Lower 'resolution'" in msg, msg
    assert "CNS_MAX_DETECT_MEGAPIXELS" in msg, msg


def test_chunks_never_hold_more_than_one_images_limit():
    from annotators.base import MAX_MEGAPIXELS_CLASSICAL, bounded_chunk_size

    assert bounded_chunk_size(8, (512, 512), network=False) == 8  # the usual case is untouched
    big = bounded_chunk_size(8, (2048, 2048), network=False)
    assert big * 2048 * 2048 / 1e6 <= MAX_MEGAPIXELS_CLASSICAL and big >= 1
    assert bounded_chunk_size(8, (4096, 4096), network=False) == 1
    assert bounded_chunk_size(8, (2048, 2048), network=True) == 1


def _node_module(host, key: str):
    import sys

    return sys.modules[host.nodes.NODE_CLASS_MAPPINGS[f"ControlNetSuiteAnnotator_{key}"].__module__]


def test_the_node_hands_every_openpose_network_to_the_memory_manager(host, monkeypatch):
    """Body, hand and face networks each reach ComfyUI's load_models_gpu as a ModelPatcher, and stay in its list of
    loaded models; a body-only run hands only the body. Named explicitly by the annotator (`networks`), not found
    by scanning its attributes: the hand and face networks are loaded only when a switch asks for them."""
    import comfy.model_management as mm

    from annotators import openpose as op

    for _kind, cls, name in (("body", op.BodyPoseNet, op.BODY_FILE), ("hand", op.HandPoseNet, op.HAND_FILE), ("face", op.FaceNet, op.FACE_FILE)):
        torch.manual_seed(0)
        torch.save(cls().state_dict(), host.dirs["annotators"] / name)  # random weights, module-form keys
    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")  # not the published files
    handed = []
    real = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **kw: (handed.append(list(models)), real(models, *a, **kw))[1])

    def run(**switches):
        g, img = image_graph(w=64, h=64, batch=1)
        n = g.add("ControlNetSuiteAnnotator_openpose", image=img, resolution=64, pixel_perfect=False, **switches)
        g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
        handed.clear()
        assert host.run(g.prompt)["img"].shape == (1, 64, 64, 3)
        (models,) = handed
        return models

    body_only = run(include_body=True, include_hand=False, include_face=False)
    assert [type(p.model).__name__ for p in body_only] == ["BodyPoseNet"]
    full = run(include_body=True, include_hand=True, include_face=True)
    assert [type(p.model).__name__ for p in full] == ["BodyPoseNet", "HandPoseNet", "FaceNet"]
    assert full[0] is body_only[0]  # one patcher per network, made once
    loaded = [lm.model for lm in mm.current_loaded_models]
    assert all(any(p is m for m in loaded) for p in full)
    det = _node_module(host, "openpose").registry.load("openpose", device=mm.unet_offload_device(), dirs=[host.dirs["annotators"]])
    assert [p.model for p in full] == det.networks(include_hand=True, include_face=True)


def test_the_node_hands_a_single_network_annotator_its_network(host, monkeypatch):
    import comfy.model_management as mm
    from factories import randomize_

    from annotators.pidinet import PiDiNet

    torch.save({"state_dict": {"module." + k: v for k, v in randomize_(PiDiNet(), 0).state_dict().items()}},
               host.dirs["annotators"] / "table5_pidinet.pth")
    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")
    handed = []
    real = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, *a, **kw: (handed.append(list(models)), real(models, *a, **kw))[1])
    g, img = image_graph(w=64, h=64, batch=2)
    n = g.add("ControlNetSuiteAnnotator_pidinet", image=img, safe=False, resolution=64, pixel_perfect=False)
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    assert host.run(g.prompt)["img"].shape == (2, 64, 64, 3)
    assert [[type(p.model).__name__ for p in models] for models in handed] == [["PiDiNet"]]


@pytest.mark.parametrize("key, settings", [("canny", {"low_threshold": 100, "high_threshold": 200}), ("binary", {"threshold": 0}),
                                           ("tile", {"pyramid_levels": 1, "blur_sigma": 0.0})])
@pytest.mark.parametrize("batch", [3, 11])  # one chunk, and two (the node runs 8 images per call)
def test_the_opencv_nodes_equal_raw_opencv_plus_the_image_conversion_bit_for_bit(host, key, settings, batch):
    """What the fast path must keep: the node's IMAGE is exactly the OpenCV result on the uint8 image, / 255 in
    float32, in 3 channels, (B, H, W, 3) contiguous, whatever route the bytes take (bench/bench_canny_node.py times it)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(batch)
    u8 = np.stack([cv2.GaussianBlur(rng.integers(0, 255, (72, 104, 3), dtype=np.uint8), (0, 0), 2) for _ in range(batch)])
    image = torch.from_numpy(u8).float() / 255.0
    node = host.nodes.NODE_CLASS_MAPPINGS[f"ControlNetSuiteAnnotator_{key}"]()
    (out,) = node.run(image, resolution=72, pixel_perfect=False, **settings)
    assert out.shape == (batch, 72, 104, 3) and out.dtype == torch.float32 and out.is_contiguous()
    det = _node_module(host, key).registry.load(key)
    for b in range(batch):
        m = det.one(u8[b], **settings)
        if key == "canny":
            assert np.array_equal(m, cv2.Canny(u8[b], 100, 200))
        m3 = np.repeat(m[..., None], 3, axis=2) if m.ndim == 2 else m
        want = np.divide(m3, np.float32(255.0), dtype=np.float32)
        assert np.array_equal(out[b].numpy().view(np.uint32), want.view(np.uint32))


def test_the_resolution_widgets_are_the_annotators_own(host):
    """One source for the resolution limits: each node's widget has the default, bounds and step its annotator declares."""
    from annotators import registry

    M = host.nodes.NODE_CLASS_MAPPINGS
    for key, info in registry.load_all().items():
        spec = M[f"ControlNetSuiteAnnotator_{key}"].INPUT_TYPES()["required"].get("resolution")
        if info.resolution is None:
            assert spec is None, key
            continue
        p = info.resolution
        assert {k: spec[1][k] for k in ("default", "min", "max", "step")} == {"default": p.default, "min": p.min, "max": p.max, "step": p.step}, key
    anyspec = M["ControlNetSuiteAnyAnnotator"].INPUT_TYPES()["required"]["resolution"][1]
    declared = [i.resolution for i in registry.load_all().values() if i.resolution is not None]
    assert all(p.min <= anyspec["min"] and anyspec["max"] <= p.max for p in declared) and anyspec["default"] == 512


def test_the_node_runs_the_annotators_one_loop_once_and_moves_the_progress_bar(host, monkeypatch):
    """11 images, 8 per chunk: two annotate calls (no second chunking inside), and ComfyUI's bar moved by 8, then 3."""
    import comfy.utils

    moved = []

    class Bar:
        def __init__(self, total):
            assert total == 11

        def update(self, n):
            moved.append(n)

    monkeypatch.setattr(comfy.utils, "ProgressBar", Bar)
    det = _node_module(host, "canny").registry.load("canny")
    calls = []
    real = type(det).annotate_chunk
    monkeypatch.setattr(type(det), "annotate_chunk", lambda self, images, **kw: (calls.append(images.shape[0]), real(self, images, **kw))[1])
    node = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteAnnotator_canny"]()
    (out,) = node.run(torch.rand(11, 64, 96, 3), resolution=64, pixel_perfect=False, low_threshold=100, high_threshold=200)
    assert out.shape == (11, 64, 96, 3) and calls == [8, 3] and moved == [8, 3]
