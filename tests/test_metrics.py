"""Controllability metrics (controlnet_core.metrics) and their glue (annotators.scoring) on hand-made maps with
known answers; no host."""
import pytest
import torch

from annotators import scoring
from controlnet_core import metrics
from controlnet_core.train import toy_metrics


def test_identical_maps_score_perfect():
    torch.manual_seed(0)
    edges = torch.rand(2, 32, 32) > 0.8
    gray = torch.rand(2, 32, 32)
    classes = torch.randint(0, 5, (2, 32, 32))
    for score, err in (metrics.f1_binary(edges, edges), metrics.ssim(gray, gray), metrics.miou(classes, classes, 5)):
        assert torch.allclose(score, torch.ones(2)) and err.shape == (2, 32, 32) and err.abs().max() < 1e-6
    rmse, err = metrics.rmse_255(gray, gray)
    assert torch.equal(rmse, torch.zeros(2)) and torch.equal(err, torch.zeros(2, 32, 32))


def test_a_shifted_edge_map_gives_the_f1_computed_by_hand():
    """A vertical line 10 px long at column 5, the prediction a 2x10 band at columns 5 and 6 (the line and a copy
    shifted by one): TP = 10, FP = 10, FN = 0, so F1 = 2*10 / (2*10 + 10 + 0) = 2/3. A line shifted by one pixel
    without the original: TP = 0, F1 = 0 (exact positions, no tolerance band)."""
    ref = torch.zeros(1, 16, 16, dtype=torch.bool)
    ref[0, 3:13, 5] = True
    band = ref.clone()
    band[0, 3:13, 6] = True
    f1, err = metrics.f1_binary(band, ref)
    assert f1.item() == pytest.approx(2 / 3) and err.sum() == 10 and err[0, 3:13, 6].all()
    shifted = torch.roll(ref, 1, dims=2)
    assert metrics.f1_binary(shifted, ref)[0].item() == 0.0
    empty = torch.zeros_like(ref)
    assert metrics.f1_binary(empty, empty)[0].item() == 1.0  # nothing asked, nothing drawn


def test_one_swapped_class_gives_the_known_miou():
    """Four quadrants of 8x8 px with classes 0, 1, 2, 3; the prediction paints quadrant 3 with class 2.
    IoU: class 0 = 1, class 1 = 1, class 2 = 64 / 128 = 1/2, class 3 = 0 / 64 = 0 (present in the reference only);
    class 4 is in neither map and is left out: mIoU = (1 + 1 + 0.5 + 0) / 4 = 0.625."""
    ref = torch.zeros(1, 16, 16, dtype=torch.long)
    ref[0, :8, 8:], ref[0, 8:, :8], ref[0, 8:, 8:] = 1, 2, 3
    pred = ref.clone()
    pred[ref == 3] = 2
    score, err = metrics.miou(pred, ref, 5)
    assert score.item() == pytest.approx(0.625) and err.sum() == 64 and err[0, 8:, 8:].all()


def test_miou_ignores_unlabelled_reference_pixels():
    ref = torch.tensor([[[0, 0], [9, 9]]])
    pred = torch.tensor([[[0, 0], [1, 1]]])
    score, err = metrics.miou(pred, ref, 10, ignore_index=9)
    assert score.item() == 1.0 and err.sum() == 0
    with pytest.raises(metrics.MetricError, match="class indices must lie in 0..9"):
        metrics.miou(torch.full((1, 2, 2), 12), ref, 10)


def test_rmse_of_a_constant_offset_is_the_offset_on_0_255():
    x = torch.full((2, 8, 8), 0.2)
    y = x + 10 / 255
    rmse, err = metrics.rmse_255(x, y)
    assert torch.allclose(rmse, torch.full((2,), 10.0), atol=1e-4) and torch.allclose(err, torch.full((2, 8, 8), 10 / 255), atol=1e-6)


def test_ssim_equals_scikit_image():
    """The oracle: scikit-image's structural_similarity with Wang et al.'s settings (Gaussian window, sigma 1.5,
    population covariance), which averages over the same cropped border."""
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 40, 48, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(2, 40, 48, generator=g, dtype=torch.float64)).clamp(0, 1)
    y[1] = 1 - x[1]  # a strong change
    ours, err = metrics.ssim(x, y)
    for i in range(2):
        want = structural_similarity(x[i].numpy(), y[i].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(want, abs=1e-5)
    assert err.shape == (2, 40, 48) and 0 <= err.min() and err.max() <= 1 and err[1].mean() > err[0].mean()


def test_ssim_of_a_constant_shift_by_hand():
    """Two flat maps a and b: every window has zero variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere.
    a = 0.5, b = 0.6, C1 = 0.0001: (0.6 + 0.0001) / (0.61 + 0.0001) = 0.98362..."""
    s, _ = metrics.ssim(torch.full((1, 12, 12), 0.5), torch.full((1, 12, 12), 0.6))
    assert s.item() == pytest.approx(0.6001 / 0.6101, abs=1e-6)
    with pytest.raises(metrics.MetricError, match="smaller than the 11x11 window"):
        metrics.ssim(torch.zeros(1, 8, 20), torch.zeros(1, 8, 20))


def test_pck_counts_keypoints_within_a_share_of_the_person_size():
    """A reference person with 4 points on a 100 px box; the prediction has 2 points 5 px off (within 0.1 x 100),
    one 20 px off and one missing: 2 of 4 correct. A second, unmatched predicted person changes nothing."""
    ref = torch.tensor([[[0.0, 0, 1], [100, 0, 1], [0, 100, 1], [100, 100, 1]]])
    pred = torch.tensor([[[5.0, 0, 1], [100, 5, 1], [120, 100, 1], [0, 0, 0]], [[0.0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]])
    assert metrics.pck([pred[:1]], [ref])[0].item() == 0.5
    assert metrics.pck([pred], [ref])[0].item() == 0.5
    assert metrics.pck([ref], [ref])[0].item() == 1.0
    assert metrics.pck([torch.zeros(0, 4, 3)], [ref])[0].item() == 0.0  # nobody found
    assert metrics.pck([torch.zeros(0, 4, 3)], [torch.zeros(0, 4, 3)])[0].item() == 1.0  # nobody asked, nobody found


def test_segmentation_classes_are_read_from_the_colour_maps():
    from annotators.segmentation import colorize_ade20k

    ids = torch.tensor([[[0, 5], [149, -1]]])  # -1: outside ADE20K, painted black
    colours = colorize_ade20k(ids)
    # a saved or resized map: near the palette, not on it (2/255 off in two channels; the closest two distinct
    # palette colours are 7.07/255 apart)
    noisy = (colours + torch.tensor([2.0, -2.0, 0.0]).view(1, 3, 1, 1) / 255).clamp(0, 1)
    want = torch.tensor([[[0, 5], [149, scoring.UNLABELLED]]])
    assert torch.equal(scoring.ade20k_classes(colours), want) and torch.equal(scoring.ade20k_classes(noisy), want)


def test_compare_segmentation_with_one_class_swapped():
    from annotators.segmentation import colorize_ade20k

    ref = torch.zeros(1, 16, 16, dtype=torch.long)
    ref[0, :8, 8:], ref[0, 8:, :8], ref[0, 8:, 8:] = 1, 2, 3
    pred = torch.where(ref == 3, 2, ref)
    score, err = scoring.compare("seg_uniformer", colorize_ade20k(pred), colorize_ade20k(ref))
    assert score.item() == pytest.approx(0.625) and err.shape == (1, 16, 16)


def test_body_keypoints_from_openpose_json_and_the_pose_score():
    from annotators.openpose import Person, to_openpose_json

    body = [(0.1 * (i % 5) + 0.1, 0.05 * i + 0.05) for i in range(18)]
    body[3] = None
    hint = to_openpose_json([Person(body=body)], 200, 100)
    kp = scoring.body_keypoints(hint)
    assert kp.shape == (1, 18, 3) and kp[0, 0].tolist() == pytest.approx([20.0, 5.0, 1.0]) and kp[0, 3, 2] == 0
    maps = torch.zeros(1, 3, 100, 200)
    score, err = scoring.compare("openpose", maps, maps, keypoints=[hint], hint_keypoints=[hint])
    assert score.item() == 1.0 and err.shape == (1, 100, 200)
    with pytest.raises(scoring.ScoreError, match="keypoints output of the OpenPose"):
        scoring.compare("openpose", maps, maps, keypoints=[hint])


def test_the_toy_score_is_toy_metrics_controllability():
    """The toy world's IoU is toy_metrics' own: the score equals controllability() on the same images."""
    from controlnet_core.train.toy import COLOURS

    hint = torch.zeros(2, 3, 32, 32)
    hint[:, :, 8, 8:24] = hint[:, :, 23, 8:24] = hint[:, :, 8:24, 8] = hint[:, :, 8:24, 23] = 1  # a square outline
    names = list(COLOURS)
    bg, fg = (torch.tensor(COLOURS[n], dtype=torch.float32) / 255 for n in names[:2])
    images = bg.view(1, 3, 1, 1).expand(2, 3, 32, 32).clone()
    images[0, :, 8:24, 8:24] = fg.view(3, 1, 1)  # the shape drawn exactly
    images[1, :, 8:24, 8:16] = fg.view(3, 1, 1)  # half of it
    score, err = scoring.compare("toy", images, hint)
    assert torch.allclose(score, toy_metrics.controllability(images, hint))
    assert score[0].item() == 1.0 and score[1].item() == pytest.approx(0.5) and err[1].sum() == 128


def test_score_broadcasts_one_hint_and_refuses_mismatched_batches():
    hint = torch.zeros(1, 3, 32, 32)
    hint[:, :, 10:20, 15] = 1
    calls = []

    def annotate(key, images, resolution, params):  # stands in for the annotator: the hint itself, for every image
        calls.append((key, tuple(images.shape), resolution))
        return hint.expand(images.shape[0], -1, -1, -1), None

    moved = []
    r = scoring.score("canny", torch.rand(3, 3, 64, 48), hint, annotate=annotate, progress=moved.append, chunk_size=2)
    assert calls == [("canny", (3, 3, 32, 32), 32)] and moved == [2, 1]
    assert torch.equal(r.scores, torch.ones(3)) and r.error_maps.shape == (3, 32, 32) and r.mean == 1.0
    with pytest.raises(scoring.ScoreError, match="3 generated images but 2 hints"):
        scoring.score("canny", torch.rand(3, 3, 32, 32), hint.expand(2, -1, -1, -1), annotate=annotate)
    with pytest.raises(scoring.ScoreError, match="edge_threshold is nan; every setting must be a finite number"):
        scoring.score("canny", torch.rand(1, 3, 32, 32), hint, annotate=annotate, edge_threshold=float("nan"))
    with pytest.raises(scoring.ScoreError, match="unknown annotator 'sketch'"):
        scoring.score("sketch", torch.rand(1, 3, 32, 32), hint, annotate=annotate)


def test_score_runs_the_real_canny_annotator_without_a_host():
    """Re-annotating the hint's own source image scores perfect."""
    from annotators import registry

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(64, 64), mode="nearest")
    hint = registry.load("canny")(img, low_threshold=100, high_threshold=200, resolution=64)
    r = scoring.score("canny", img, hint, annotator_params={"low_threshold": 100, "high_threshold": 200})
    assert r.scores.tolist() == [1.0] and hint.amax() == 1
