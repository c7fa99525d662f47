"""ControlNet Score (Suite) inside the real ComfyUI: hint from the Suite's annotator node, score of images against it,
the per-image list, the mean, the error map, and the errors a user meets."""
import pytest
import torch
from host import Graph, PromptFailed


def _images(g: Graph, batch: int, seed: int, size: int = 64):
    return (g.add("SuiteTestImage", width=size, height=size, channels=3, batch=batch, seed=seed), 0)


def _score(g: Graph, images, hint, annotator: str, **extra) -> str:
    n = g.add("ControlNetSuiteScore", images=images, hint=hint, annotator=annotator, **extra)
    g.add("SuiteTestCaptureImage", image=(n, 2), key="error_map")
    return n


def _previewed(host, g: Graph, node: str, output: int) -> str | None:
    """A "Preview as Text" node on one output (ComfyUI runs it once per item of a list output, and its texts are read
    from the run's history); None on a host without that node."""
    if "PreviewAny" not in host.nodes.NODE_CLASS_MAPPINGS:
        return None
    return g.add("PreviewAny", source=(node, output))


def test_the_node_is_registered_with_tooltips(host):
    cls = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteScore"]
    assert cls.CATEGORY == "conditioning/controlnet" and cls.RETURN_TYPES == ("FLOAT", "FLOAT", "IMAGE")
    assert cls.OUTPUT_IS_LIST == (True, False, False)
    spec = cls.INPUT_TYPES()
    assert {"canny", "seg_uniformer", "openpose", "toy"} <= set(spec["required"]["annotator"][0])
    assert all(s[1].get("tooltip") for section in spec.values() for s in section.values())


def test_canny_scores_one_per_image_the_mean_and_the_error_map(host):
    """The hint is the Canny map of images A (batch 2); A against it scores 1 per image, other images B less."""
    g = Graph()
    a, b = _images(g, 2, seed=0), _images(g, 2, seed=5)
    hint = (g.add("ControlNetSuiteAnnotator_canny", image=a, low_threshold=100, high_threshold=200, resolution=64, pixel_perfect=False), 0)
    same = _score(g, a, hint, "canny")
    other = g.add("ControlNetSuiteScore", images=b, hint=hint, annotator="canny")
    shown = {k: _previewed(host, g, n, i) for k, n, i in (("same", same, 0), ("same_mean", same, 1), ("other", other, 0))}
    out = host.run(g.prompt)
    assert out["error_map"].shape == (2, 64, 64, 3) and out["error_map"].max() == 0
    if shown["same"] is not None:
        ui = host.executor.history_result["outputs"]
        assert [float(t) for t in ui[shown["same"]]["text"]] == [1.0, 1.0]
        assert [float(t) for t in ui[shown["same_mean"]]["text"]] == [1.0]
        others = [float(t) for t in ui[shown["other"]]["text"]]
        assert len(others) == 2 and all(0 <= s < 1 for s in others)


def test_one_hint_is_used_for_every_image_and_the_outputs_are_plain_floats(host):
    node = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteScore"]()
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(48, 64), mode="nearest").movedim(1, -1)
    canny = host.nodes.NODE_CLASS_MAPPINGS["ControlNetSuiteAnnotator_canny"]()
    (hint,) = canny.run(img, resolution=48, pixel_perfect=False, low_threshold=100, high_threshold=200)
    scores, mean, error_map = node.score(img.expand(3, -1, -1, -1), hint, "canny")
    assert scores == [1.0, 1.0, 1.0] and mean == 1.0 and all(type(s) is float for s in scores) and type(mean) is float
    assert error_map.shape == (3, 48, 64, 3)


def test_segmentation_against_its_own_map_scores_one(host, monkeypatch):
    """UniFormer with random weights (its official file layout, in the annotators folder): the hint is its map of
    images A, so A scores mIoU 1; the error map has the hint's size."""
    import json
    from pathlib import Path

    from annotators.segmentation import WEIGHTS_FILE, UniformerUperNet

    torch.manual_seed(0)
    palette = json.loads((Path(__file__).parents[1] / "annotators" / "data" / "ade20k_palette_150.json").read_text())
    torch.save({"meta": {"CLASSES": tuple(f"class{i}" for i in range(150)), "PALETTE": palette},
                "state_dict": UniformerUperNet().eval().state_dict()}, host.dirs["annotators"] / WEIGHTS_FILE)
    monkeypatch.setenv("CNS_SKIP_HASH_CHECK", "1")
    g = Graph()
    a = _images(g, 1, seed=2)
    hint = (g.add("ControlNetSuiteAnnotator_seg_uniformer", image=a, resolution=64, pixel_perfect=False), 0)
    n = _score(g, a, hint, "seg_uniformer")
    shown = _previewed(host, g, n, 0)
    out = host.run(g.prompt)
    assert out["error_map"].shape == (1, 64, 64, 3) and out["error_map"].max() == 0
    if shown is not None:
        assert [float(t) for t in host.executor.history_result["outputs"][shown]["text"]] == [1.0]


def test_batch_mismatch_and_missing_pose_keypoints_are_clear_errors(host):
    g = Graph()
    _score(g, _images(g, 3, seed=0), _images(g, 2, seed=1), "canny")
    with pytest.raises(PromptFailed, match="3 generated images but 2 hints; connect one hint for all images or one hint per image"):
        host.run(g.prompt)
    g = Graph()
    _score(g, _images(g, 1, seed=0), _images(g, 1, seed=1), "openpose")
    with pytest.raises(PromptFailed, match="hint's keypoints are missing.*keypoints output of the OpenPose"):
        host.run(g.prompt)
