"""OpenPose annotator: checkpoint layout, parity with controlnet-aux 0.0.10, drawing, JSON keypoints, errors.

Random weights make meaningless people, so the pipeline parity runs with small stand-in networks that draw a
known skeleton into their heatmaps and PAFs; the real networks are compared on their raw outputs.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from annotators import openpose as op
from annotators import weights
from annotators.registry import ANNOTATORS

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from controlnet_aux.open_pose import OpenposeDetector as RefDetector
    from controlnet_aux.open_pose import util as ref_util
    from controlnet_aux.open_pose.body import Body as RefBody
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.face import Face as RefFace
    from controlnet_aux.open_pose.hand import Hand as RefHand

KEYS = Path(__file__).parent / "data" / "annot_keys"
NETS = {"body": op.BodyPoseNet, "hand": op.HandPoseNet, "face": op.FaceNet}
FILES = {"body": op.BODY_FILE, "hand": op.HAND_FILE, "face": op.FACE_FILE}
N_PARAMS = {"body": 52_311_446, "hand": 36_832_324, "face": 38_425_706}  # formats.md section B
NET_RTOL = 1e-4  # same float32 convolutions, batched vs one at a time: only summation order differs


def dump(name: str) -> dict[str, tuple]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        k, shape = line.split("\t")[:2]
        out[k] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def he_init(module: nn.Module) -> nn.Module:
    """Scale PyTorch's default uniform init (variance 1/(3 fan_in)) to He variance 2/fan_in: keeps activations O(1)
    through the 20+ layers, so output comparisons mean something (and no second random draw of 127 M numbers)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(math.sqrt(6.0))
    return module.eval()


def official_layout(kind: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The published files' keys: body/hand without the container name (undone by `util.transfer`), face flat."""
    sd = module.state_dict()
    return sd if kind == "face" else {k.split(".", 1)[1]: v for k, v in sd.items()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These CPUs are shared: one thread runs these small convolutions several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Random-weight checkpoints in the official container: a flat dict of tensors, body/hand keys unprefixed."""
    d = tmp_path_factory.mktemp("openpose")
    out = {}
    for i, (kind, cls) in enumerate(NETS.items()):
        torch.manual_seed(10 + i)
        out[kind] = d / FILES[kind]
        torch.save(official_layout(kind, he_init(cls())), out[kind])
    return out


@pytest.fixture(scope="module")
def detector(files) -> op.OpenPoseDetector:
    """Loaded once through from_file; hand and face come in lazily on first use."""
    det = op.OpenPoseDetector.from_file(files["body"], files["hand"], files["face"])
    assert det._nets == {"hand": None, "face": None}
    return det


# --- 1. layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["body", "hand", "face"])
def test_keys_shapes_and_counts_match_the_published_checkpoints(kind):
    with torch.device("meta"):
        net = NETS[kind]()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == dump(f"annot_openpose_{kind}.tsv")
    assert sum(p.numel() for p in net.parameters()) == N_PARAMS[kind]


def test_the_official_files_have_no_container_prefix(files):
    keys = list(torch.load(files["body"], weights_only=True))
    assert "conv1_1.weight" in keys and "Mconv7_stage6_L2.bias" in keys and not any(k.startswith("model") for k in keys)
    assert "conv6_2_CPM.weight" in torch.load(files["hand"], weights_only=True)


# --- 2. the networks against controlnet-aux on the same files ------------------------------------------------


def test_networks_match_controlnet_aux(files, detector):
    """Their loaders (torch.load + util.transfer) and ours read the same files; raw outputs agree.

    The body runs batched here (2 images) against theirs one by one. Small inputs keep the CPU time low;
    the convolutions do not depend on the size.
    """
    ref_body, ref_hand, ref_face = RefBody(str(files["body"])), RefHand(str(files["hand"])), RefFace(str(files["face"]))
    x = torch.rand(2, 3, 48, 64) - 0.5
    with torch.inference_mode():
        paf, heat = detector.body(x)
        for b in range(2):
            rpaf, rheat = ref_body.model(x[b : b + 1])
            for a, r in ((paf[b], rpaf[0]), (heat[b], rheat[0])):
                torch.testing.assert_close(a, r, rtol=NET_RTOL, atol=NET_RTOL * r.abs().max().item())
        assert heat.shape == (2, 19, 6, 8) and paf.shape == (2, 38, 6, 8) and heat.std() > 0.01
        assert heat.min() >= 0  # the reference's stray ReLU after Mconv7_stage6_L2
        xs = x[:1, :, :40, :40]
        for kind, ref in (("hand", ref_hand.model(xs)), ("face", ref_face.model(xs)[-1])):  # their face gives all 6 stages
            got = detector.network(kind)(xs)
            torch.testing.assert_close(got, ref, rtol=NET_RTOL, atol=NET_RTOL * ref.abs().max().item())
            assert got.shape == (1, 22 if kind == "hand" else 71, 5, 5) and got.std() > 0.01


# --- 3. stand-in networks that "see" a known skeleton -----------------------------------------------------

SKELETON = [(0.50, 0.16), (0.50, 0.27), (0.41, 0.27), (0.36, 0.41), (0.34, 0.55), (0.59, 0.27), (0.64, 0.41),
            (0.66, 0.55), (0.45, 0.56), (0.45, 0.72), (0.45, 0.88), (0.55, 0.56), (0.55, 0.72), (0.55, 0.88),
            (0.47, 0.13), (0.53, 0.13), (0.44, 0.15), (0.56, 0.15)]  # fmt: skip
# image 0: one person; image 1: two people, narrower, side by side (scene picked from the image's grey level)
SCENES = [[(0.0, 0.0, 1.0)], [(-0.22, 0.0, 0.6), (0.22, 0.04, 0.6)]]


def scene_people(scene: int) -> list[list[tuple[float, float]]]:
    return [[(0.5 + dx + (x - 0.5) * sx, y + dy) for x, y in SKELETON] for dx, dy, sx in SCENES[scene]]


def _cells(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")


def _at(p, h: int, w: int) -> tuple[float, float]:
    """A fraction of the input -> map cell coordinates (cell i covers input pixels 8i..8i+7)."""
    return p[0] * w - 0.5, p[1] * h - 0.5


def _blobs(points, h: int, w: int, sigma: float = 1.0) -> torch.Tensor:
    ys, xs = _cells(h, w)
    out = torch.zeros(h, w)
    for p in points:
        cx, cy = _at(p, h, w)
        out += torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma * sigma))
    return out


class FakeBody(nn.Module):
    """Heatmap blobs at the scene's joints and, along each limb, its unit direction in the limb's PAF pair."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, _, hp, wp = x.shape
        h, w = hp // 8, wp // 8
        ys, xs = _cells(h, w)
        heat, paf = torch.zeros(b, 19, h, w), torch.zeros(b, 38, h, w)
        for i in range(b):
            people = scene_people(int(x[i, 0, 0, 0] > 0))
            for part in range(18):
                heat[i, part] = _blobs([p[part] for p in people], h, w)
            for person in people:
                for (a, c), (cx, cy) in zip(op.LIMBS, op.PAF_CHANNELS):
                    (ax, ay), (bx, by) = _at(person[a - 1], h, w), _at(person[c - 1], h, w)
                    n = math.hypot(bx - ax, by - ay)
                    ux, uy = (bx - ax) / n, (by - ay) / n
                    t = ((xs - ax) * ux + (ys - ay) * uy).clamp(0, n)
                    near = (xs - ax - t * ux) ** 2 + (ys - ay - t * uy) ** 2 <= 1.5**2
                    paf[i, cx][near], paf[i, cy][near] = ux, uy
        return paf, heat


class RandomBody(nn.Module):
    """Smooth random heatmaps and PAFs: some 200 candidates, crossing limbs, merges, rejected people."""

    def __init__(self, seed: int):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seed = seed

    def forward(self, x):
        g = torch.Generator().manual_seed(self.seed)
        b, _, hp, wp = x.shape
        h, w = hp // 8, wp // 8
        heat = torch.nn.functional.interpolate(torch.rand(b, 19, h // 4 + 1, w // 4 + 1, generator=g), (h, w), mode="bilinear") ** 3
        paf = torch.nn.functional.interpolate(torch.rand(b, 38, h // 3 + 1, w // 3 + 1, generator=g) * 2 - 1, (h, w), mode="bilinear")
        return paf, heat


@pytest.mark.parametrize("seed", [0, 2])
def test_assembly_of_many_candidates_matches_controlnet_aux(seed):
    """Their Body.__call__ (resize, pad, upsample, peaks, PAF scoring, greedy assembly) against ours, same maps:
    identical candidates and people, bit for bit (128 x 160 also exercises the padding to a multiple of 8)."""
    body = RefBody.__new__(RefBody)
    body.model = RandomBody(seed)
    img = np.random.default_rng(seed).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    ref_candidates, ref_people = body(img)
    heat, paf = op.OpenPoseDetector(RandomBody(seed)).body_maps(img[None])
    candidates, people = op.assemble_people(op.body_peaks(heat[0]), paf[0], 128)
    assert len(ref_candidates) > 100 and len(ref_people) > 3
    np.testing.assert_array_equal(candidates, ref_candidates)
    np.testing.assert_array_equal(people, ref_people)


HAND_SHAPE = [(0.5, 0.85)] + [(0.5 + 0.09 * j * math.cos(a), 0.85 - 0.13 * j * math.sin(a))
                              for a in np.linspace(0.5, 2.6, 5) for j in (1, 2, 3, 4)]  # fmt: skip
FACE_SHAPE = [(0.5 + 0.35 * math.cos(t), 0.5 + 0.4 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 70, endpoint=False)]


class FakeCPM(nn.Module):
    """Hand or face stand-in: one blob per point; some maps left empty to exercise the "not found" paths."""

    def __init__(self, shape, channels: int, empty: tuple[int, ...], as_list: bool = False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.shape, self.channels, self.empty, self.as_list = shape, channels, empty, as_list

    def forward(self, x):
        b, _, hp, wp = x.shape
        out = torch.zeros(b, self.channels, hp // 8, wp // 8)
        for c, p in enumerate(self.shape):
            if c not in self.empty:
                out[:, c] = _blobs([p], hp // 8, wp // 8)
        return [out] if self.as_list else out


def fake_hand(as_list=False):
    return FakeCPM(HAND_SHAPE, 22, empty=(20,), as_list=as_list)


def fake_face(as_list=False):
    return FakeCPM(FACE_SHAPE, 71, empty=(5,), as_list=as_list)


def reference_detector() -> RefDetector:
    body, hand, face = RefBody.__new__(RefBody), RefHand.__new__(RefHand), RefFace.__new__(RefFace)
    body.model, hand.model, face.model = FakeBody(), fake_hand(), fake_face(as_list=True)
    return RefDetector(body, hand, face)


def scene_images(size: int = 256) -> torch.Tensor:
    """Two flat grey images (60 and 200): the stand-ins tell the scenes apart by the grey level."""
    grey = torch.tensor([60.0, 200.0]).view(2, 1, 1, 1) / 255.0
    return grey.expand(2, 3, size, size).contiguous()


def _same_points(ours, ref) -> None:
    if ref is None:
        assert ours is None
        return
    assert ours is not None and len(ours) == len(ref)
    for p, k in zip(ours, ref):
        if k is None:
            assert p is None
        else:
            assert (p[0], p[1]) == (k.x, k.y)  # bit-identical: same arithmetic, same precision


def _same_points(ours: list | None, ref) -> None:
    """JSON triples against controlnet-aux keypoints: bit-identical (same arithmetic, same precision)."""
    if ref is None:
        assert ours is None
        return
    assert ours is not None and len(ours) == 3 * len(ref)
    for i, k in enumerate(ref):
        assert ours[3 * i : 3 * i + 3] == ([0.0, 0.0, 0.0] if k is None else [float(k.x), float(k.y), 1.0])


def test_pipeline_matches_controlnet_aux_with_the_same_networks():
    """Peaks, limb assembly, hand and face crops, their peak search, the drawing: identical to controlnet-aux
    (its OpenposeDetector.__call__ is detect_poses + draw_poses at this size, where its resizes are no-ops)."""
    from controlnet_aux.open_pose import draw_poses

    det = op.OpenPoseDetector(FakeBody(), fake_hand(), fake_face())
    images = scene_images()
    maps, keypoints = det.detect(images, include_hand=True, include_face=True, resolution=256)
    assert maps.shape == (2, 3, 256, 256)
    ref = reference_detector()
    rgb = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for b in range(2):
        ref_people = ref.detect_poses(rgb[b], include_hand=True, include_face=True)
        ref_map = draw_poses(ref_people, 256, 256)
        np.testing.assert_array_equal((maps[b] * 255).round().byte().permute(1, 2, 0).numpy(), ref_map)
        people = keypoints[b]["people"]
        assert len(people) == len(ref_people) == len(SCENES[b])
        for ours, theirs in zip(people, ref_people):
            _same_points(ours["pose_keypoints_2d"], theirs.body.keypoints)
            _same_points(ours["hand_left_keypoints_2d"], theirs.left_hand)
            _same_points(ours["hand_right_keypoints_2d"], theirs.right_hand)
            _same_points(ours["face_keypoints_2d"], theirs.face)
    # the face skips its empty map 5 (69 of 70 points, no background); the hand keeps its missing point 20 at -1/W
    p = keypoints[0]["people"][0]
    assert len(p["face_keypoints_2d"]) == 69 * 3 and len(p["hand_left_keypoints_2d"]) == len(p["hand_right_keypoints_2d"]) == 63
    assert p["hand_left_keypoints_2d"][60:] == [float(np.float32(-1) / 256)] * 2 + [1.0]


def test_found_skeleton_is_where_it_was_drawn():
    det = op.OpenPoseDetector(FakeBody())
    _, keypoints = det.detect(scene_images(), resolution=256)
    for b in range(2):
        found = sorted(keypoints[b]["people"], key=lambda p: p["pose_keypoints_2d"][0])
        assert len(found) == len(SCENES[b])
        for person, truth in zip(found, scene_people(b)):
            xy = np.array(person["pose_keypoints_2d"]).reshape(18, 3)
            assert (xy[:, 2] == 1.0).all()
            # a network cell is 256/184 * 8 = 11 px; peaks land within one cell of the blob centre
            np.testing.assert_allclose(xy[:, :2], np.array(truth), atol=12 / 256)


# --- 4. drawing with fixed keypoints ----------------------------------------------------------------------


def fixed_person(width: int, height: int) -> tuple[op.Person, list]:
    """A hand-made skeleton with missing joints, two hands (one point missing) and a face, in ours and their types."""
    body = [None if i in (3, 17) else p for i, p in enumerate(SKELETON)]
    hand_l = np.array([(0.66 + (x - 0.5) * 0.2, 0.55 + (y - 0.85) * 0.2) for x, y in HAND_SHAPE], dtype=np.float32)
    hand_r = hand_l.copy()
    hand_r[:, 0] -= np.float32(0.32)
    hand_r[7] = (np.float32(-1) / width, np.float32(-1) / height)
    face = np.array([(0.5 + (x - 0.5) * 0.1, 0.14 + (y - 0.5) * 0.1) for x, y in FACE_SHAPE], dtype=np.float32)
    ours = op.Person(body=body, left_hand=hand_l, right_hand=hand_r, face=face)

    def kps(arr):
        return [Keypoint(x=p[0], y=p[1]) for p in arr]

    from controlnet_aux.open_pose import BodyResult, PoseResult

    theirs = PoseResult(BodyResult([None if p is None else Keypoint(*p) for p in body], 1.0, 16), kps(hand_l), kps(hand_r), kps(face))
    return ours, theirs


@pytest.mark.parametrize("height, width", [(512, 512), (384, 640)])
@pytest.mark.parametrize("parts", [(True, False, False), (True, True, True), (False, True, True)])
def test_drawing_is_identical_to_controlnet_aux(height, width, parts):
    from controlnet_aux.open_pose import draw_poses

    ours, theirs = fixed_person(width, height)
    body, hand, face = parts
    got = op.draw_people([ours], height, width, body=body, hand=hand, face=face)
    want = draw_poses([theirs], height, width, draw_body=body, draw_hand=hand, draw_face=face)
    np.testing.assert_array_equal(got, want)
    assert got.any()


def test_drawing_colours_and_rules():
    canvas = op.draw_body(np.zeros((256, 256, 3), np.uint8), [None] * 18)
    assert not canvas.any()
    body = [None] * 18
    body[1], body[2] = (0.5, 0.5), (0.3, 0.5)  # neck -> right shoulder: limb 0, red at 60%
    canvas = op.draw_body(np.zeros((256, 256, 3), np.uint8), body)
    assert tuple(canvas[128, 102]) == (153, 0, 0)  # between the joints: limb colour x 0.6
    assert tuple(canvas[128, 128]) == op.BODY_COLORS[1]  # joint disc, full colour
    import matplotlib.colors

    for i, c in enumerate(op.HAND_COLORS):
        np.testing.assert_array_equal(np.array(c), matplotlib.colors.hsv_to_rgb([i / 20.0, 1.0, 1.0]) * 255)


# --- 5. keypoint JSON ------------------------------------------------------------------------------------


def test_json_of_the_fixed_skeleton():
    ours, _ = fixed_person(640, 384)
    ours.right_hand = None
    js = op.to_openpose_json([ours], width=640, height=384)
    assert js["canvas_width"] == 640 and js["canvas_height"] == 384 and len(js["people"]) == 1
    person = js["people"][0]
    assert set(person) == {"pose_keypoints_2d", "face_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d"}
    pose = np.array(person["pose_keypoints_2d"]).reshape(18, 3)
    for i, p in enumerate(SKELETON):
        assert tuple(pose[i]) == ((0.0, 0.0, 0.0) if i in (3, 17) else (p[0], p[1], 1.0))
    assert np.array(person["hand_left_keypoints_2d"]).reshape(21, 3)[:, :2].tolist() == ours.left_hand.tolist()
    assert len(person["face_keypoints_2d"]) == 70 * 3
    assert person["hand_right_keypoints_2d"] is None
    import json

    assert json.loads(json.dumps(js)) == js  # plain Python types only


def test_annotate_returns_maps_and_detect_adds_json():
    det = op.OpenPoseDetector(FakeBody())
    images = scene_images(128)[:, :, :, :96]  # 128 x 96, detected at 192 x 128, map resized back
    maps = det(images, resolution=128)
    again, js = det.detect(images, resolution=128)
    assert maps.shape == (2, 3, 128, 96) and torch.equal(maps, again)
    assert [j["canvas_width"] for j in js] == [96, 96] and [j["canvas_height"] for j in js] == [128, 128]
    off, js_off = det.detect(images, resolution=128, include_body=False)
    assert not off.any() and js_off == js  # drawing switched off; keypoints still reported
    for j in js:
        for p in j["people"]:
            assert p["face_keypoints_2d"] is None and p["hand_left_keypoints_2d"] is None


# --- 6. real (random) weights through from_file ------------------------------------------------------------


def test_from_file_end_to_end_with_random_weights(detector):
    det = op.OpenPoseDetector(detector.body, detector.network("hand"), detector.network("face"))
    det.body_scales, det.hand_scales, det.face_size = (0.25,), (0.125,), 64  # fewer pixels: CPU time only
    images = torch.rand(2, 3, 48, 64)
    maps, js = det.detect(images, resolution=64, include_hand=True, include_face=True)
    assert maps.shape == (2, 3, 48, 64) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert len(js) == 2 and all(j["canvas_width"] == 64 and j["canvas_height"] == 48 for j in js)
    # the stand-in body finds people, so the real (random) hand and face networks run on their crops
    det.body = FakeBody()
    maps, js = det.detect(scene_images(128), resolution=128, include_hand=True, include_face=True)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 and maps.any()
    assert js[1]["people"] and all(len(p["hand_left_keypoints_2d"]) == 63 for p in js[1]["people"])


def test_lazy_networks_follow_the_body_dtype(files):
    det = op.OpenPoseDetector(FakeBody().to(torch.bfloat16), hand_file=files["hand"])
    hand = det.network("hand")
    assert isinstance(hand, op.HandPoseNet) and next(hand.parameters()).dtype == torch.bfloat16
    assert det.network("hand") is hand and not hand.training and not next(hand.parameters()).requires_grad


def test_registry_entry_and_manifest(files):
    info = ANNOTATORS["openpose"]
    assert info.keypoints and info.weights == [op.BODY_FILE, op.HAND_FILE, op.FACE_FILE]
    assert [p.name for p in info.params] == ["include_body", "include_hand", "include_face", "resolution"]
    assert all(p.tooltip for p in info.params) and "non-commercial" in info.licence
    for f in info.weights:
        spec = weights.MANIFEST[f]
        assert spec.url.endswith("/lllyasviel/Annotators/resolve/main/" + f) and len(spec.sha256) == 64 and spec.size > 1e8
        assert "non-commercial" in spec.licence and spec.model == "openpose"
    det = info.build({op.BODY_FILE: files["body"], op.HAND_FILE: files["hand"], op.FACE_FILE: files["face"]}, torch.device("cpu"), torch.float32)
    assert isinstance(det, op.OpenPoseDetector) and det.name == "openpose"


# --- 6b. through the registry: only the files the switches need, each hashed once ------------------------------


@pytest.fixture
def published(files, monkeypatch) -> list:
    """The random files stand in for the published ones (their SHA-256 in the manifest); returns the paths hashed from
    now on, with the process's digest memory and the registry's cache empty."""
    import dataclasses
    import hashlib
    import os

    from annotators import registry

    for kind, path in files.items():
        spec = weights.MANIFEST[FILES[kind]]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        monkeypatch.setitem(weights.MANIFEST, FILES[kind], dataclasses.replace(spec, sha256=digest, size=path.stat().st_size))
    calls = []
    real = weights.sha256_of
    monkeypatch.setattr(weights, "sha256_of", lambda path, *a, **kw: (calls.append(os.path.realpath(path)), real(path, *a, **kw))[1])
    monkeypatch.setattr(weights, "_DIGESTS", {})
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.delenv("CNS_SKIP_HASH_CHECK", raising=False)
    return calls


BODY_ONLY = {"include_body": True, "include_hand": False, "include_face": False}


def test_body_only_needs_and_hashes_only_the_body_file(files, published, tmp_path):
    from annotators import registry

    only_body = tmp_path / "only_body"
    only_body.mkdir()
    (only_body / op.BODY_FILE).symlink_to(files["body"])
    det = registry.load("openpose", dirs=[only_body], params=BODY_ONLY)  # hand and face files absent: not needed
    assert published == [str(files["body"].resolve())]
    assert det.networks(**BODY_ONLY) == [det.body] and det._files == {"hand": None, "face": None}
    # all three files present: a body-only call still hashes none of the others (nor the body again)
    published.clear()
    full = registry.load("openpose", dirs=[files["body"].parent], params=BODY_ONLY)
    assert published == [] and full._files == {"hand": None, "face": None}
    assert registry.load("openpose", dirs=[files["body"].parent], params=BODY_ONLY) is full and published == []
    # the library default (no params) still asks for every file, as before
    with pytest.raises(weights.AnnotatorWeightsError, match=r"'hand_pose_model\.pth' not found"):
        registry.load("openpose", dirs=[only_body])


def test_a_switch_turned_on_later_hashes_and_attaches_only_its_file(files, published):
    from annotators import registry

    d = [files["body"].parent]
    det = registry.load("openpose", dirs=d, params=BODY_ONLY)
    published.clear()
    with_hand = registry.load("openpose", dirs=d, params={**BODY_ONLY, "include_hand": True})
    assert with_hand is det and published == [str(files["hand"].resolve())]  # the same body, the hand file added
    nets = det.networks(include_hand=True)
    assert [type(n) for n in nets] == [op.BodyPoseNet, op.HandPoseNet] and det._nets["face"] is None
    published.clear()
    assert registry.load("openpose", dirs=d, params={"include_hand": True, "include_face": True}) is det
    assert published == [str(files["face"].resolve())]
    assert [type(n) for n in det.networks(include_hand=True, include_face=True)] == [op.BodyPoseNet, op.HandPoseNet, op.FaceNet]
    published.clear()
    for params in (None, BODY_ONLY, {"include_hand": True, "include_face": True}):
        assert registry.load("openpose", dirs=d, params=params) is det
    assert published == []


def test_attach_weights_takes_only_the_hand_and_face_files(files):
    det = op.OpenPoseDetector(FakeBody())
    with pytest.raises(op.AnnotatorError, match="cannot take weight files"):
        det.attach_weights({op.BODY_FILE: files["body"]})
    det.attach_weights({op.HAND_FILE: files["hand"]})
    hand = det.network("hand")
    det.attach_weights({op.HAND_FILE: files["hand"]})  # the same file again: the loaded network is kept
    assert det.network("hand") is hand
    det.attach_weights({op.HAND_FILE: files["face"]})  # another file: loaded from it when next needed
    with pytest.raises(weights.AnnotatorWeightsError, match="facenet.pth.*OpenPose hand"):
        det.network("hand")


# --- 7. errors --------------------------------------------------------------------------------------------


def test_wrong_weight_files_name_the_file(files, tmp_path):
    with pytest.raises(weights.AnnotatorWeightsError, match="hand_pose_model.pth.*OpenPose body"):
        op.OpenPoseDetector.from_file(files["hand"])
    junk = tmp_path / "body_pose_model.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(weights.AnnotatorWeightsError, match=str(junk)):
        op.OpenPoseDetector.from_file(junk)
    det = op.OpenPoseDetector(FakeBody(), face_file=files["hand"])
    with pytest.raises(weights.AnnotatorWeightsError, match="hand_pose_model.pth.*not given"):
        det(scene_images(64), resolution=64, include_hand=True)
    with pytest.raises(weights.AnnotatorWeightsError, match="hand_pose_model.pth.*OpenPose face"):
        det(scene_images(256), resolution=256, include_face=True)


# --- helpers against the libraries the reference uses -------------------------------------------------------


def test_helpers_match_scipy_skimage_and_reference_util():
    from scipy.ndimage import gaussian_filter
    from skimage.measure import label

    rng = np.random.default_rng(0)
    x = rng.random((70, 90))
    np.testing.assert_allclose(op.gaussian3(x), gaussian_filter(x, sigma=3), rtol=0, atol=1e-12)
    img = rng.integers(0, 256, (100, 75, 3), dtype=np.uint8)
    for fx in (0.5, 1.84, 0.7361):
        np.testing.assert_array_equal(op.smart_resize(img, 100 * fx, 75 * fx), ref_util.smart_resize_k(img, fx, fx))
    padded, down, right = op.pad_to_stride(img)
    ref_padded, pad = ref_util.padRightDownCorner(img, 8, 128)
    np.testing.assert_array_equal(padded, ref_padded)
    assert (down, right) == (pad[2], pad[3])
    # hand peaks: biggest 8-connected blob, numbered in raster order as skimage does
    heat = np.zeros((128, 128, 22))
    for part in range(21):
        m = rng.random((128, 128)) ** 8
        heat[:, :, part] = m
        raw = m.copy()
        lab, n = label(np.ascontiguousarray(op.gaussian3(m) > 0.05, dtype=np.uint8), return_num=True, connectivity=2)
        best = np.argmax([np.sum(raw[lab == i]) for i in range(1, n + 1)]) + 1
        raw[lab != best] = 0
        want = ref_util.npmax(raw)
        got = op.hand_peaks(heat, 128, 128)[part]
        assert (got[1], got[0]) == want
