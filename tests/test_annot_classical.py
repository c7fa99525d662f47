"""Classical annotators: checked against the OpenCV calls they wrap and against hand-made images with known answers."""
import math

import cv2
import numpy as np
import pytest
import torch

from annotators import AnnotatorError, registry
from annotators.classical import ade20k_palette, inpaint_hint


def square_image(size=128, lo=40, hi=88):
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def as_batch(*imgs):
    return torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in imgs])


def run(key, x, **kw):
    return registry.load(key)(x, resolution=min(x.shape[-2:]), **kw)


def test_canny_equals_opencv_and_finds_the_four_sides_of_a_square():
    img = square_image()
    out = run("canny", as_batch(img), low_threshold=100, high_threshold=200)
    ours = (out[0, 0] * 255).round().numpy().astype(np.uint8)
    assert np.array_equal(ours, cv2.Canny(img, 100, 200))
    ys, xs = np.nonzero(ours)
    # every edge pixel lies on one of the four sides (within a pixel), and each side is found
    on_side = (np.abs(ys - 40) <= 1) | (np.abs(ys - 87) <= 1) | (np.abs(xs - 40) <= 1) | (np.abs(xs - 87) <= 1)
    assert on_side.all()
    for sel in (np.abs(ys - 40) <= 1, np.abs(ys - 87) <= 1, np.abs(xs - 40) <= 1, np.abs(xs - 87) <= 1):
        assert sel.sum() >= 40


@pytest.mark.parametrize("method", ["probabilistic hough", "lsd"])
def test_hough_lines_of_a_square_are_its_four_sides(method):
    out = run("hough_lines", as_batch(square_image()), method=method, threshold=30, min_line_length=30, max_line_gap=5)
    m = (out[0, 0] > 0.5).numpy().astype(np.uint8)
    lines = cv2.HoughLinesP(m * 255, 1, np.pi / 180, 30, minLineLength=30, maxLineGap=5)
    assert lines is not None
    angles = {round(math.degrees(math.atan2(l[3] - l[1], l[2] - l[0]))) % 180 for l in lines.reshape(-1, 4)}
    assert angles <= {0, 90} and angles == {0, 90}
    rows, cols = np.nonzero(m)
    assert {r for r in range(35, 95) if m[r].sum() > 30} and len({c for c in range(35, 95) if m[:, c].sum() > 30}) >= 2


def test_binary_otsu_and_scribble_threshold_and_invert():
    img = np.full((64, 64, 3), 230, np.uint8)
    cv2.line(img, (5, 5), (60, 60), (10, 10, 10), 3)
    x = as_batch(img)
    b = run("binary", x)[0, 0].numpy()
    ref = cv2.threshold(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)[1] / 255
    assert np.array_equal(b, ref.astype(np.float32))
    s = run("scribble_threshold", x, threshold=127)[0, 0]
    assert s[30, 30] == 1.0 and s[5, 60] == 0.0
    inv = registry.load("invert")(x)
    torch.testing.assert_close(inv, 1 - x)


def test_lineart_standard_matches_controlnet_aux():
    from controlnet_aux.lineart_standard import LineartStandardDetector

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8), (0, 0), 2)
    # at a detect resolution equal to the image's size (multiples of 64) neither side resamples
    theirs = np.asarray(LineartStandardDetector()(img, detect_resolution=128, output_type="np"))
    ours = (run("lineart_standard", as_batch(img))[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert theirs.shape == ours.shape
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1  # same recipe; rounding of the final uint8 cast


def test_xdog_scribble_of_a_dark_stroke():
    img = np.full((64, 64, 3), 255, np.uint8)
    cv2.line(img, (10, 32), (54, 32), (0, 0, 0), 2)
    s = run("scribble_xdog", as_batch(img), threshold=32)[0, 0]
    assert s[32, 32] == 1.0 and s[5, 5] == 0.0 and s.sum() < 64 * 64 / 4


def test_shuffle_is_deterministic_per_seed_and_keeps_the_palette():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :32] = (255, 0, 0)
    img[:, 32:] = (0, 0, 255)
    x = as_batch(img)
    a, b, c = run("shuffle", x, seed=1), run("shuffle", x, seed=1), run("shuffle", x, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    colours = {tuple(v) for v in (a[0].permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()}
    assert colours <= {(255, 0, 0), (0, 0, 255)}


def test_tile_blurs_and_keeps_size():
    x = torch.rand(2, 3, 64, 96)
    y = run("tile", x, pyramid_levels=2)
    assert y.shape == x.shape and y.std() < x.std()


def test_normal_from_depth_of_a_ramp_points_sideways():
    ramp = np.tile(np.linspace(0.2, 1.0, 64, dtype=np.float32), (64, 1))
    x = torch.from_numpy(ramp)[None, None].expand(1, 3, 64, 64)
    n = registry.load("normal_from_depth")(x)[0]
    mid = n[:, 32, 32] * 2 - 1
    assert mid[0] > 0.5 and abs(mid[1]) < 0.01 and mid[2] > 0.1  # x slope, no y slope (uint8 rounding: 127 vs 127.5), facing the camera
    flat = registry.load("normal_from_depth")(torch.full((1, 3, 16, 16), 0.5))[0, :, 8, 8]
    torch.testing.assert_close(flat, torch.tensor([127.5, 127.5, 255.0]) / 255, atol=1 / 255 + 1e-6, rtol=0)  # uint8: 127 for 127.5


def test_segmentation_colours_use_the_ade20k_palette():
    ids = torch.tensor([[0, 1, 149, 200]], dtype=torch.float32) / 255
    out = registry.load("seg_colors")(ids[:, None].expand(1, 3, 1, 4).reshape(1, 3, 1, 4))
    rgb = (out[0, :, 0].T * 255).round().int().tolist()
    pal = ade20k_palette()
    assert rgb[0] == [120, 120, 120] and rgb[1] == pal[1].tolist() and rgb[2] == [92, 0, 255] and rgb[3] == [0, 0, 0]


def test_inpaint_hint_marks_masked_pixels_with_minus_one():
    x = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    y = inpaint_hint(x, mask)
    assert (y[:, :, :16] == -1).all() and torch.equal(y[:, :, 16:], x[:, :, 16:])


@pytest.mark.parametrize("key", ["canny", "hough_lines", "scribble_xdog", "binary", "lineart_standard", "shuffle", "tile", "normal_from_depth"])
@pytest.mark.parametrize("case", ["gray", "rgba", "tiny", "nan"])
def test_bad_and_odd_inputs(key, case):
    x = {"gray": torch.rand(2, 1, 40, 50), "rgba": torch.rand(2, 4, 40, 50), "tiny": torch.rand(1, 3, 8, 8),
         "nan": torch.full((1, 3, 32, 32), float("nan"))}[case]
    y = registry.load(key)(x, resolution=64)
    assert y.shape == (x.shape[0], 3, *x.shape[-2:]) and torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


def test_huge_image_is_processed_at_the_detect_resolution():
    x = torch.rand(1, 3, 4096, 4096)
    y = registry.load("canny")(x, resolution=256)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_empty_batch_is_a_clear_error():
    with pytest.raises(AnnotatorError, match="empty"):
        registry.load("canny")(torch.zeros(0, 3, 16, 16))
    with pytest.raises(AnnotatorError, match="channels"):
        registry.load("canny")(torch.zeros(1, 5, 16, 16))


@pytest.mark.parametrize("key", ["canny", "hough_lines", "scribble_xdog", "binary", "lineart_standard", "shuffle", "tile"])
def test_uint8_batches_give_the_float_batches_maps(key):
    """An RGB uint8 batch (what OpenCV and PIL users hold) goes to OpenCV unconverted, at and off the detect size;
    1-channel and RGBA uint8 batches are read as 0..255 too."""
    rng = np.random.default_rng(1)
    imgs = [cv2.GaussianBlur(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), (0, 0), 2) for _ in range(3)]
    imgs[0][10:30, 10:40] = 255
    u8 = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    for res in (48, 96):
        assert torch.equal(registry.load(key)(u8, resolution=res), registry.load(key)(as_batch(*imgs), resolution=res))
    gray = u8[:, :1]
    assert torch.equal(run(key, gray), run(key, gray.float() / 255))
    rgba = torch.cat([u8, torch.full_like(u8[:, :1], 255)], 1)
    assert torch.equal(run(key, rgba), run(key, u8))


def test_integer_batches_other_than_uint8_are_a_clear_error():
    with pytest.raises(AnnotatorError, match="int16"):
        registry.load("canny")(torch.zeros(1, 3, 16, 16, dtype=torch.int16))


def test_infinities_saturate():
    x = torch.zeros(1, 3, 32, 32)
    x[0, :, 8:24, 8:24] = float("inf")  # a white square written as +inf
    x[0, :, 0, :] = float("-inf")
    ours = (run("canny", x)[0, 0] * 255).round().numpy().astype(np.uint8)
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    assert np.array_equal(ours, cv2.Canny(img, 100, 200))


def test_fast_and_general_uint8_conversions_agree():
    """The OpenCV conversion of a clean channels-last float image equals the torch one (used for everything else)."""
    from annotators.classical import image_uint8

    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    images = (torch.from_numpy(u8).float() / 255).permute(0, 3, 1, 2)  # channels-last view: the fast path
    for img, ref in zip(images, u8):
        assert np.array_equal(image_uint8(img), ref)
        assert np.array_equal(image_uint8(img.contiguous()), ref)  # NCHW: the torch path
    noisy = torch.rand(1, 60, 70, 3).permute(0, 3, 1, 2)
    assert np.array_equal(image_uint8(noisy[0]), image_uint8(noisy[0].contiguous()))  # one rounding rule for both
    bad = noisy.clone()
    bad[0, :, 0, 0] = float("nan")
    bad[0, :, 0, 1] = 2.0
    bad[0, :, 0, 2] = -1.0
    out = image_uint8(bad[0])  # out of range: the saturating torch path
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255] * 3 and out[0, 2].tolist() == [0, 0, 0]


def test_the_range_check_on_the_float_bits_sends_every_odd_value_to_the_torch_path():
    """The fast path takes an image only when every value is in [+0, 1] (checked as unsigned float bits); the odd
    values (negative zero, the smallest subnormal, the float just above 1, infinities, NaN) give the torch path's bytes."""
    from annotators.classical import image_uint8

    odd = [-0.0, 1e-45, float(np.nextafter(np.float32(1), np.float32(2))), float("inf"), float("-inf"), float("nan"), -1e-30, 0.5, 1.0]
    for v in odd:
        x = torch.rand(1, 8, 8, 3)
        x[0, 3, 4, 1] = v
        chw = x.permute(0, 3, 1, 2)[0]  # channels-last view: the fast path's layout
        assert np.array_equal(image_uint8(chw), image_uint8(chw.contiguous())), v  # NCHW copy: always the torch path


@pytest.mark.parametrize("key", ["canny", "binary", "scribble_threshold", "lineart_standard", "tile", "shuffle", "hough_lines"])
def test_maps_are_the_float_image_of_the_uint8_map_bit_for_bit(key):
    """uint8 map -> float: x / 255 in float32 for every value (a table lookup now). A channels-last batch (the node's
    IMAGE) gets a channels-last result, (B, H, W, 3) in memory; an NCHW one keeps a gray map as one broadcast plane."""
    det = registry.load(key)
    rng = np.random.default_rng(0)
    u8 = np.stack([cv2.GaussianBlur(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), (0, 0), 2) for _ in range(2)])
    x = torch.from_numpy(u8).float().div(255).permute(0, 3, 1, 2)  # as the node hands it over
    out = det(x, resolution=64)
    assert out.shape == (2, 3, 64, 96) and out.dtype == torch.float32 and out.movedim(1, -1).is_contiguous()
    nchw = det(x.contiguous(), resolution=64)
    assert torch.equal(nchw, out) and (nchw.stride(1) == 0) == (det.one(u8[0]).ndim == 2)
    for b in range(2):
        m = det.one(u8[b])
        m3 = np.repeat(m[..., None], 3, axis=2) if m.ndim == 2 else m
        want = np.divide(m3, np.float32(255.0), dtype=np.float32)
        assert np.array_equal(out[b].permute(1, 2, 0).numpy().view(np.uint32), want.view(np.uint32))
