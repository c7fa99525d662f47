"""OpenPose body (18 COCO keypoints), hands (21) and face (70 + 1), drawn as the ControlNet 1.1 "openpose" annotator.

Networks: the CMU models as ported by pytorch-openpose and shipped in lllyasviel/Annotators:
- body: 6-stage part-affinity-field network (Cao et al., https://arxiv.org/abs/1611.08050), VGG-19 front,
  38 PAF channels (L1) and 19 heatmaps (L2, 18 parts + background);
- hand: 6-stage convolutional pose machine (Simon et al., https://arxiv.org/abs/1704.07809), 22 heatmaps;
- face: the same CPM layout with 71 heatmaps.

The pipeline follows controlnet-aux 0.0.10 `open_pose` (a copy of ControlNet-v1-1-nightly `annotator/openpose`)
step for step, including its resize filters (OpenCV INTER_AREA when shrinking, INTER_LANCZOS4 when enlarging),
BGR input scaled to x/256 - 0.5, right/bottom padding to a multiple of 8 with 128, the body network at one scale
(0.5 x 368 / height), the hands at four fixed scales and the face at 384 x 384. Only the networks run in torch
(batched over the chunk, and over all hands / faces of the chunk); the peak search and limb assembly are the
reference's numpy algorithm, per image, and are kept bit-compatible so the same maps give the same skeletons.

Reference quirks kept on purpose, because ControlNet was trained on what they produce:
- the last body heatmap convolution (`Mconv7_stage6_L2`) is followed by a ReLU (a typo in the reference's
  list of layers without ReLU);
- face peaks are searched in all 71 maps (background included) and maps with no value above 0.05 are skipped,
  so a face can have fewer than 71 points;
- a hand point that was not found is kept at (-1 / W, -1 / H) with confidence 1, as the reference emits it.

Licence: the CMU OpenPose models (and the drawing code derived from pytorch-openpose) are for non-commercial use
only (CMU academic licence, `annotator/openpose/LICENSE`).
"""
from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import weights
from ._core import ControlNetError
from .base import AnnotatorError, NetworkAnnotator, as_rgb, detect_size, inference_network, network_input, resize_to
from .registry import AnnotatorInfo, Param, Published, register, resolution_param

log = logging.getLogger(__name__)

BODY_FILE = "body_pose_model.pth"
HAND_FILE = "hand_pose_model.pth"
FACE_FILE = "facenet.pth"
LICENCE = "CMU OpenPose licence: non-commercial research use only (commercial use needs a licence from CMU)"

PathLike = Union[str, os.PathLike]

# --- networks ---------------------------------------------------------------------------------------------
# A layer is (name, in channels, out channels, kernel) or the name of a 2x2 max pool. Names are the checkpoint's.

Layer = Union[str, tuple[str, int, int, int]]

_VGG: tuple[Layer, ...] = (
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool1_stage1",
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), "pool2_stage1",
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3), "pool3_stage1",
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
)  # fmt: skip
BODY_TRUNK = _VGG + (("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3))
CPM_TRUNK = _VGG + (
    ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3), ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3)
)  # fmt: skip


def _body_stage1(branch: int, out: int) -> tuple[Layer, ...]:
    return tuple((f"conv5_{i}_CPM_L{branch}", 128, 128, 3) for i in (1, 2, 3)) + (
        (f"conv5_4_CPM_L{branch}", 128, 512, 1), (f"conv5_5_CPM_L{branch}", 512, out, 1))  # fmt: skip


def _cpm_stage1(out: int) -> tuple[Layer, ...]:
    return (("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, out, 1))


def _refinement(tag: str, cin: int, out: int) -> tuple[Layer, ...]:
    """Stages 2-6: five 7x7 and two 1x1 convolutions on [previous maps, trunk features]."""
    return tuple((f"Mconv{i}_stage{tag}", cin if i == 1 else 128, out if i == 7 else 128, 7 if i <= 5 else 1) for i in range(1, 8))


def _sequential(layers: Sequence[Layer], relu_last: bool = False) -> nn.Sequential:
    """Convolutions with a ReLU after each, except the last (a map output) unless `relu_last`."""
    mods: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, str):
            mods.append((layer, nn.MaxPool2d(kernel_size=2, stride=2)))
            continue
        name, cin, cout, k = layer
        mods.append((name, nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2)))
        if i < len(layers) - 1 or relu_last:
            mods.append((f"relu_{name}", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(mods))


class BodyPoseNet(nn.Module):
    """(B, 3, H, W) BGR/256 - 0.5 -> (PAFs (B, 38, H/8, W/8), heatmaps (B, 19, H/8, W/8)).

    Two branches per stage (L1: part affinity fields, L2: part heatmaps), each stage re-reading the trunk features.
    """

    def __init__(self):
        super().__init__()
        self.model0 = _sequential(BODY_TRUNK, relu_last=True)
        self.model1_1 = _sequential(_body_stage1(1, 38))
        self.model1_2 = _sequential(_body_stage1(2, 19))
        for t in range(2, 7):
            self.add_module(f"model{t}_1", _sequential(_refinement(f"{t}_L1", 185, 38)))
            # The reference forgot Mconv7_stage6_L2 in its no-ReLU list: the final heatmaps are ReLU'd.
            self.add_module(f"model{t}_2", _sequential(_refinement(f"{t}_L2", 185, 19), relu_last=t == 6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model0(x)
        paf, heat = self.model1_1(features), self.model1_2(features)
        for t in range(2, 7):
            h = torch.cat([paf, heat, features], 1)
            paf, heat = getattr(self, f"model{t}_1")(h), getattr(self, f"model{t}_2")(h)
        return paf, heat


class HandPoseNet(nn.Module):
    """(B, 3, H, W) BGR/256 - 0.5 -> 22 heatmaps (21 hand points + background) at 1/8 of the input."""

    def __init__(self):
        super().__init__()
        self.model1_0 = _sequential(CPM_TRUNK, relu_last=True)
        self.model1_1 = _sequential(_cpm_stage1(22))
        for t in range(2, 7):
            self.add_module(f"model{t}", _sequential(_refinement(str(t), 150, 22)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model1_0(x)
        h = self.model1_1(features)
        for t in range(2, 7):
            h = getattr(self, f"model{t}")(torch.cat([h, features], 1))
        return h


class FaceNet(nn.Module):
    """(B, 3, H, W) BGR/256 - 0.5 -> 71 heatmaps (70 face points + background) of the last stage, 1/8 of the input.

    The face checkpoint is flat (`conv1_1.weight`, `Mconv7_stage6.bias`), so the convolutions are direct
    attributes and the stage order lives in `_plan` instead of in nn.Sequential containers.
    """

    def __init__(self):
        super().__init__()
        stages = [CPM_TRUNK, _cpm_stage1(71)] + [_refinement(str(t), 199, 71) for t in range(2, 7)]
        self._plan: list[list[tuple[str, bool]]] = []
        for s, layers in enumerate(stages):
            ops = []
            for i, layer in enumerate(layers):
                if isinstance(layer, str):
                    ops.append(("", False))
                    continue
                name, cin, cout, k = layer
                self.add_module(name, nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2))
                ops.append((name, s == 0 or i < len(layers) - 1))
            self._plan.append(ops)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for name, relu in self._plan[i]:
            x = F.max_pool2d(x, 2, 2) if not name else getattr(self, name)(x)
            if relu:
                x = x.relu_()  # x is this layer's fresh output
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._stage(0, x)
        h = self._stage(1, features)
        for i in range(2, len(self._plan)):
            h = self._stage(i, torch.cat([h, features], 1))
        return h


# --- loading ----------------------------------------------------------------------------------------------


def official_to_module_keys(module: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The body and hand files store each key without its container (`conv1_1.weight` for `model0.conv1_1.weight`);
    pytorch-openpose's `util.transfer` puts it back. Keys already in module form are left as they are."""
    own = module.state_dict().keys()
    table = {k.split(".", 1)[1]: k for k in own}
    return {(k if k in own else table.get(k, k)): v for k, v in sd.items()}


_NETWORKS = {"body": (BodyPoseNet, "OpenPose body"), "hand": (HandPoseNet, "OpenPose hand"), "face": (FaceNet, "OpenPose face")}


def load_network(kind: str, path: PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build and strictly load 'body', 'hand' or 'face'; an unreadable or foreign file raises AnnotatorWeightsError."""
    module, what = _NETWORKS[kind]
    net = module()
    try:
        sd = weights.load_state_dict(path, strip_prefixes=("module.",))
    except weights.AnnotatorWeightsError:
        raise
    except ControlNetError as e:
        raise weights.AnnotatorWeightsError(f"{path}: cannot be read as the {what} weights ({e}).") from None
    if kind != "face":
        sd = official_to_module_keys(net, sd)
    weights.load_into(net, sd, path, what)
    return inference_network(net, device, dtype)


# --- image helpers (OpenCV, as the reference) -------------------------------------------------------------

BOXSIZE = 368
STRIDE = 8
PAD_VALUE = 128


def smart_resize(x: np.ndarray, height: float, width: float) -> np.ndarray:
    """The reference's `smart_resize`: INTER_AREA when the size shrinks (judged on height + width), else LANCZOS4.

    cv2 resizes the channels of a map independently, so a heatmap stack goes in a few calls, not one per channel
    (INTER_AREA shrinking takes at most 4 channels a call).
    """
    k = float(height + width) / float(x.shape[0] + x.shape[1])
    mode = cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4
    size = (int(width), int(height))
    if x.ndim == 3 and x.shape[2] > 4 and mode == cv2.INTER_AREA:
        return np.concatenate([smart_resize(x[:, :, i : i + 4], height, width) for i in range(0, x.shape[2], 4)], axis=2)
    out = cv2.resize(np.ascontiguousarray(x), size, interpolation=mode)
    return out if out.ndim == x.ndim else out[..., None]


def pad_to_stride(img: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Pad bottom/right to a multiple of 8 with grey 128 -> (padded, rows added, columns added)."""
    h, w = img.shape[:2]
    down, right = (-h) % STRIDE, (-w) % STRIDE
    if down or right:
        img = cv2.copyMakeBorder(img, 0, down, 0, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, down, right


_GAUSS_R = 12  # scipy's radius for sigma 3: int(4 * sigma + 0.5)
_GAUSS = np.exp(-0.5 * np.arange(-_GAUSS_R, _GAUSS_R + 1) ** 2 / 9.0)
_GAUSS /= _GAUSS.sum()


def gaussian3(x: np.ndarray) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(x, sigma=3) (float64, mirrored borders) without needing scipy."""
    return cv2.sepFilter2D(np.ascontiguousarray(x, dtype=np.float64), cv2.CV_64F, _GAUSS, _GAUSS, borderType=cv2.BORDER_REFLECT)


def _net_input(batch: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, 3) uint8 BGR -> (B, 3, H, W) x/256 - 0.5 (exact in float32, then cast)."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 256.0 - 0.5
    return network_input(x, device, dtype)


# --- body: peaks and limb assembly ------------------------------------------------------------------------

# COCO-18 limbs (1-based, as everywhere in OpenPose code) and the PAF channel pair of each.
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))  # fmt: skip
PAF_CHANNELS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
                (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))  # fmt: skip
PART_THRESHOLD = 0.1  # thre1
PAF_THRESHOLD = 0.05  # thre2
PAF_SAMPLES = 10


def body_peaks(heat: np.ndarray) -> list[list[tuple[int, int, float, int]]]:
    """Per part: local maxima of the blurred heatmap above 0.1 as (x, y, raw score, running id), row-major order."""
    out, counter = [], 0
    for part in range(18):
        raw = heat[:, :, part]
        g = gaussian3(raw)
        nb = np.zeros((4,) + g.shape)
        nb[0, 1:, :], nb[1, :-1, :], nb[2, :, 1:], nb[3, :, :-1] = g[:-1, :], g[1:, :], g[:, :-1], g[:, 1:]
        ys, xs = np.nonzero((g >= nb).all(0) & (g > PART_THRESHOLD))
        out.append([(int(x), int(y), float(raw[y, x]), counter + i) for i, (y, x) in enumerate(zip(ys, xs))])
        counter += len(ys)
    return out


def _linspace10(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.linspace(a, b, 10) for each pair, with numpy's scalar arithmetic (so sample rounding is identical)."""
    step = (b - a) / (PAF_SAMPLES - 1)
    t = np.arange(PAF_SAMPLES, dtype=np.float64)
    y = np.where(step[..., None] == 0, a[..., None] + 0.0 * t, t * step[..., None] + a[..., None])
    y[..., -1] = b
    return y


def connect_limb(cand_a: list, cand_b: list, paf_xy: np.ndarray, height: int) -> np.ndarray:
    """Greedy matching of one limb's end candidates by the PAF line integral -> rows (id A, id B, score, i, j).

    A pair qualifies when more than 80% of 10 samples along it align with the field by over 0.05 and the mean
    alignment, minus a penalty for limbs longer than half the image height, is positive.
    """
    a = np.array([c[:2] for c in cand_a], dtype=np.int64)[:, None, :]
    b = np.array([c[:2] for c in cand_b], dtype=np.int64)[None, :, :]
    d = b - a  # (nA, nB, 2)
    norm = np.maximum(0.001, np.sqrt((d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]).astype(np.float64)))
    ux, uy = d[..., 0] / norm, d[..., 1] / norm
    a, b = np.broadcast_arrays(a, b)
    xs = np.rint(_linspace10(a[..., 0].astype(np.float64), b[..., 0].astype(np.float64))).astype(np.int64)
    ys = np.rint(_linspace10(a[..., 1].astype(np.float64), b[..., 1].astype(np.float64))).astype(np.int64)
    s = paf_xy[ys, xs, 0] * ux[..., None] + paf_xy[ys, xs, 1] * uy[..., None]  # (nA, nB, 10)
    total = s[..., 0]
    for t in range(1, PAF_SAMPLES):  # sequential, as the reference's builtin sum()
        total = total + s[..., t]
    prior = np.minimum(0.5 * height / norm - 1, 0)
    score = total / PAF_SAMPLES + prior
    ok = ((s > PAF_THRESHOLD).sum(-1) > 0.8 * PAF_SAMPLES) & (score > 0)
    pairs = [(i, j, float(score[i, j])) for i, j in zip(*np.nonzero(ok))]
    pairs.sort(key=lambda p: p[2], reverse=True)  # stable, like sorted(..., reverse=True)
    rows, used_a, used_b = [], set(), set()
    for i, j, sc in pairs:
        if i in used_a or j in used_b:
            continue
        rows.append([cand_a[i][3], cand_b[j][3], sc, i, j])
        used_a.add(i)
        used_b.add(j)
        if len(rows) >= min(len(cand_a), len(cand_b)):
            break
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def assemble_people(peaks: list[list[tuple]], paf: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenPose's greedy person assembly -> (candidates (N, 4): x, y, score, id; people (P, 20)).

    A person row holds 18 candidate ids (-1: missing), the total score and the number of parts; people with
    fewer than 4 parts or a mean score under 0.4 are dropped.
    """
    candidates = np.array([p for part in peaks for p in part], dtype=np.float64).reshape(-1, 4)
    people: list[np.ndarray] = []
    for k, ((pa, pb), chans) in enumerate(zip(LIMBS, PAF_CHANNELS)):
        ca, cb = peaks[pa - 1], peaks[pb - 1]
        if not ca or not cb:
            continue
        conn = connect_limb(ca, cb, paf[:, :, list(chans)], height)
        ia, ib = pa - 1, pb - 1
        for row in conn:
            id_a, id_b, sc = row[0], row[1], row[2]
            found = [j for j, p in enumerate(people) if p[ia] == id_a or p[ib] == id_b][:2]
            if len(found) == 1:
                p = people[found[0]]
                if p[ib] != id_b:
                    p[ib] = id_b
                    p[-1] += 1
                    p[-2] += candidates[int(id_b), 2] + sc
            elif len(found) == 2:
                p1, p2 = people[found[0]], people[found[1]]
                both = ((p1 >= 0).astype(int) + (p2 >= 0).astype(int))[:-2]
                if not (both == 2).any():  # disjoint: merge the second into the first
                    p1[:-2] += p2[:-2] + 1
                    p1[-2:] += p2[-2:]
                    p1[-2] += sc
                    del people[found[1]]
                else:
                    p1[ib] = id_b
                    p1[-1] += 1
                    p1[-2] += candidates[int(id_b), 2] + sc
            elif k < 17:
                p = -np.ones(20)
                p[ia], p[ib] = id_a, id_b
                p[-1] = 2
                p[-2] = sum(candidates[row[:2].astype(int), 2]) + sc
                people.append(p)
    people = [p for p in people if not (p[-1] < 4 or p[-2] / p[-1] < 0.4)]
    return candidates, np.array(people, dtype=np.float64).reshape(-1, 20)


# --- hands and face ---------------------------------------------------------------------------------------

Point = Optional[tuple[float, float]]


def hand_boxes(body: Sequence[Point], height: int, width: int) -> list[tuple[int, int, int, bool]]:
    """Square hand crops (x, y, side, is_left) from shoulder, elbow and wrist in pixels (OpenPose handDetector.cpp):
    centred a third of the forearm beyond the wrist, 1.5 x max(forearm, 0.9 x upper arm) wide, clipped, >= 20 px."""
    out = []
    for (s, e, w), is_left in (((5, 6, 7), True), ((2, 3, 4), False)):
        if body[s] is None or body[e] is None or body[w] is None:
            continue
        (x1, y1), (x2, y2), (x3, y3) = body[s], body[e], body[w]
        x = x3 + 0.33 * (x3 - x2)
        y = y3 + 0.33 * (y3 - y2)
        side = 1.5 * max(math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2), 0.9 * math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2))
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        w1 = width - x if x + side > width else side
        w2 = height - y if y + side > height else side
        side = min(w1, w2)
        if side >= 20:
            out.append((int(x), int(y), int(side), is_left))
    return out


def face_box(body: Sequence[Point], height: int, width: int) -> Optional[tuple[int, int, int]]:
    """Face crop (x, y, side) around the nose, sized from the eye (x3) and ear (x1.5) distances (ControlNet 1.1).

    As in the reference, the clipping tests `x + side/2`, so a crop at the right/bottom edge can come out narrower.
    """
    if body[0] is None or all(body[i] is None for i in (14, 15, 16, 17)):
        return None
    x0, y0 = body[0]
    half = 0.0
    for i, f in ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)):
        if body[i] is not None:
            half = max(half, max(abs(x0 - body[i][0]), abs(y0 - body[i][1])) * f)
    x, y = max(x0 - half, 0), max(y0 - half, 0)
    w1 = width - x if x + half > width else half * 2
    w2 = height - y if y + half > height else half * 2
    side = min(w1, w2)
    return (int(x), int(y), int(side)) if side >= 20 else None


def hand_peaks(heat: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """(128, 128, 22) averaged hand heatmaps -> (21, 2) peak (x, y) in crop pixels; (0, 0) where nothing is above 0.05.

    Per point: the 8-connected blob of the blurred map with the largest raw mass, then its maximum.
    """
    size = heat.shape[0]
    out = []
    for part in range(21):
        raw = heat[:, :, part].copy()
        binary = np.ascontiguousarray(gaussian3(raw) > 0.05, dtype=np.uint8)
        if not binary.any():
            out.append([0, 0])
            continue
        n, labels = cv2.connectedComponents(binary, connectivity=8)
        ids, first = np.unique(labels.ravel(), return_index=True)  # number blobs in raster order, as skimage does
        order = ids[ids > 0][np.argsort(first[ids > 0], kind="stable")]
        best = order[int(np.argmax([np.sum(raw[labels == i]) for i in order]))]
        raw[labels != best] = 0
        y, x = np.unravel_index(int(np.argmax(raw)), raw.shape)
        out.append([int(float(x) * float(crop_w) / float(size)), int(float(y) * float(crop_h) / float(size))])
    return np.array(out)


def face_peaks(heat: np.ndarray) -> np.ndarray:
    """(71, h, w) face heatmaps -> (n, 2) (x, y) of each map's maximum above 0.05; maps without one are skipped."""
    flat = heat.reshape(heat.shape[0], -1)
    keep = (flat > 0.05).any(1)
    idx = np.argmax(np.where(flat > 0.05, flat, -np.inf), axis=1)[keep]
    ys, xs = np.unravel_index(idx, heat.shape[1:])
    return np.stack([xs, ys], 1)


def _to_canvas_fraction(peaks: np.ndarray, x0: int, y0: int, height: int, width: int) -> np.ndarray:
    """Crop pixels -> fractions of the canvas in float32; 0 means "not found" and becomes -1 / size (as the reference)."""
    p = peaks.astype(np.float32)
    p[:, 0] = np.where(p[:, 0] < 1e-6, -1, p[:, 0] + x0) / float(width)
    p[:, 1] = np.where(p[:, 1] < 1e-6, -1, p[:, 1] + y0) / float(height)
    return p


# --- people, drawing, JSON --------------------------------------------------------------------------------


@dataclass
class Person:
    """One detected person. Coordinates are fractions of the canvas width and height, as the reference keeps them.

    `body` has the 18 COCO points (None: not found) in float64; hands (21, 2) and face (n, 2) are float32 arrays,
    the reference's precision, which the drawing's pixel rounding depends on.
    """

    body: list[Point]
    score: float = 0.0
    left_hand: Optional[np.ndarray] = None
    right_hand: Optional[np.ndarray] = None
    face: Optional[np.ndarray] = None


BODY_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))  # fmt: skip
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))  # fmt: skip
STICK_WIDTH = 4
_EPS = 0.01


def _hsv_rainbow(h: float) -> tuple[float, float, float]:
    """matplotlib.colors.hsv_to_rgb([h, 1, 1]) * 255 with its exact arithmetic (cv2 rounds the result)."""
    i = int(h * 6.0)
    f = h * 6.0 - i
    q, t = 1.0 * (1.0 - 1.0 * f), 1.0 * (1.0 - 1.0 * (1.0 - f))
    rgb = ((1.0, t, 0.0), (q, 1.0, 0.0), (0.0, 1.0, t), (0.0, q, 1.0), (t, 0.0, 1.0), (1.0, 0.0, q))[i % 6]
    return tuple(c * 255 for c in rgb)


HAND_COLORS = tuple(_hsv_rainbow(i / float(len(HAND_EDGES))) for i in range(len(HAND_EDGES)))


def draw_body(canvas: np.ndarray, body: Sequence[Point]) -> np.ndarray:
    """17 limbs as filled ellipses (half-length x 4 px) at 60% colour, then 18 joints as radius-4 discs."""
    h, w = canvas.shape[:2]
    for (a, b), color in zip(LIMBS[:17], BODY_COLORS):
        if body[a - 1] is None or body[b - 1] is None:
            continue
        xs = np.array([body[a - 1][0], body[b - 1][0]]) * float(w)
        ys = np.array([body[a - 1][1], body[b - 1][1]]) * float(h)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, [int(float(c) * 0.6) for c in color])
    for p, color in zip(body, BODY_COLORS):
        if p is not None:
            cv2.circle(canvas, (int(p[0] * w), int(p[1] * h)), 4, color, thickness=-1)
    return canvas


def draw_hand(canvas: np.ndarray, hand: Optional[np.ndarray]) -> np.ndarray:
    """20 rainbow bones (2 px) and blue radius-4 joints; points at the canvas edge or outside count as missing."""
    if hand is None or len(hand) == 0:
        return canvas
    h, w = canvas.shape[:2]
    px = [(int(p[0] * w), int(p[1] * h)) for p in hand]
    for (a, b), color in zip(HAND_EDGES, HAND_COLORS):
        (x1, y1), (x2, y2) = px[a], px[b]
        if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for x, y in px:
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def draw_face(canvas: np.ndarray, face: Optional[np.ndarray]) -> np.ndarray:
    """White radius-3 dots."""
    if face is None or len(face) == 0:
        return canvas
    h, w = canvas.shape[:2]
    for p in face:
        x, y = int(p[0] * w), int(p[1] * h)
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)
    return canvas


def draw_people(
    people: Sequence[Person], height: int, width: int, *, body: bool = True, hand: bool = True, face: bool = True
) -> np.ndarray:
    """(height, width, 3) uint8 RGB canvas, black, with each person's body, then hands, then face."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for p in people:
        if body:
            draw_body(canvas, p.body)
        if hand:
            draw_hand(canvas, p.left_hand)
            draw_hand(canvas, p.right_hand)
        if face:
            draw_face(canvas, p.face)
    return canvas


def _flat(points: Optional[Sequence]) -> Optional[list[float]]:
    """[x, y, 1.0, ...], with 0, 0, 0 for a missing point; None when the part is absent."""
    if points is None or len(points) == 0:
        return None
    out: list[float] = []
    for p in points:
        out += [0.0, 0.0, 0.0] if p is None else [float(p[0]), float(p[1]), 1.0]
    return out


def to_openpose_json(people: Sequence[Person], width: int, height: int) -> dict:
    """The OpenPose-style dict that sd-webui-controlnet and comfyui_controlnet_aux emit (`encode_poses_as_dict`).

    Coordinates are fractions of the canvas (0-1), not pixels, and the confidence is 1.0 for every emitted point
    (0, 0, 0 for a missing body point), because their pose editors read a confidence below 1 as "missing".
    The body is always reported (hands and face are found from it); hands and face are null when not requested
    or not found.
    """
    return {
        "people": [
            {
                "pose_keypoints_2d": _flat(p.body),
                "face_keypoints_2d": _flat(p.face),
                "hand_left_keypoints_2d": _flat(p.left_hand),
                "hand_right_keypoints_2d": _flat(p.right_hand),
            }
            for p in people
        ],
        "canvas_width": int(width),
        "canvas_height": int(height),
    }


# --- the annotator ----------------------------------------------------------------------------------------


class OpenPoseDetector(NetworkAnnotator):
    """ControlNet 1.1 "openpose" maps (body; `_hand`, `_face`, `_full` with the switches) and OpenPose JSON keypoints.

    The hand and face networks are optional: pass modules, or files that are loaded on first use (then kept),
    so a body-only user never reads 300 MB of weights it does not need. `networks(include_hand=..., include_face=...)`
    lists (and loads) the networks a call with those switches runs, body first.
    """

    name = "openpose"
    _KINDS = {HAND_FILE: "hand", FACE_FILE: "face"}  # switched weight files (see attach_weights)

    def __init__(
        self,
        body: nn.Module,
        hand: Optional[nn.Module] = None,
        face: Optional[nn.Module] = None,
        *,
        hand_file: Optional[PathLike] = None,
        face_file: Optional[PathLike] = None,
        body_scales: Sequence[float] = (0.5,),
        hand_scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
        face_size: int = 384,
        max_batch: int = 8,
    ):
        self.body = body
        self._nets: dict[str, Optional[nn.Module]] = {"hand": hand, "face": face}
        self._files: dict[str, Optional[PathLike]] = {"hand": hand_file, "face": face_file}
        self._lock = threading.Lock()
        self.body_scales = tuple(body_scales)  # the reference uses (0.5,); several are averaged (not its doubled sum)
        self.hand_scales = tuple(hand_scales)  # x 368 px, the reference's four
        self.face_size = int(face_size)  # the reference's 384
        self.max_batch = max(1, int(max_batch))

    @classmethod
    def from_file(
        cls,
        body_path: PathLike,
        hand_path: Optional[PathLike] = None,
        face_path: Optional[PathLike] = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "OpenPoseDetector":
        """Load `body_pose_model.pth` now; `hand_pose_model.pth` / `facenet.pth` on the first call that needs them."""
        body = load_network("body", body_path, device=device, dtype=dtype)
        return cls(body, hand_file=hand_path, face_file=face_path)

    def networks(self, include_hand: bool = False, include_face: bool = False, **params) -> list[nn.Module]:
        """The body network, then the hand and face networks when switched on (loaded from their files now)."""
        return [self.body] + [self.network(kind) for kind, wanted in (("hand", include_hand), ("face", include_face)) if wanted]

    def attach_weights(self, paths: dict[str, PathLike]) -> None:
        """Take the hand and/or face file (manifest names `hand_pose_model.pth`, `facenet.pth`) for later calls.

        A network already loaded from another path is dropped and loaded from the new one when next needed."""
        unknown = sorted(set(paths) - set(self._KINDS))
        if unknown:
            raise AnnotatorError(f"openpose: cannot take weight files {unknown}; only {sorted(self._KINDS)} are added after loading.")
        with self._lock:
            for filename, path in paths.items():
                kind = self._KINDS[filename]
                if self._files[kind] is not None and Path(self._files[kind]) == Path(path):
                    continue
                if self._files[kind] is not None:
                    self._nets[kind] = None  # loaded from the file it replaces
                self._files[kind] = path

    def network(self, kind: str) -> nn.Module:
        """The 'hand' or 'face' network, loaded once from its file on first use."""
        with self._lock:
            net = self._nets[kind]
            if net is None:
                path = self._files[kind]
                if path is None:
                    spec = weights.MANIFEST[HAND_FILE if kind == "hand" else FACE_FILE]
                    raise weights.AnnotatorWeightsError(
                        f"openpose: include_{kind} needs the {kind} weights '{spec.filename}', which were not given. "
                        f"Pass its path to OpenPoseDetector.from_file, or run '{spec.fetch_command}'."
                    )
                log.info("loading OpenPose %s weights from %s", kind, path)
                net = self._nets[kind] = load_network(kind, path, device=self.device, dtype=self.dtype)
            return net

    # -- networks over batches --

    def _forward(self, net: nn.Module, batch: np.ndarray) -> list[np.ndarray]:
        """Run `net` over (N, H, W, 3) uint8 BGR in slices of `max_batch`; each output as float32 numpy (N, C, h, w)."""
        outs: list[list[np.ndarray]] = []
        for i in range(0, len(batch), self.max_batch):
            y = net(_net_input(batch[i : i + self.max_batch], self.device, self.dtype))
            ys = y if isinstance(y, (tuple, list)) else (y,)
            outs.append([t.float().cpu().numpy() for t in ys])
        return [np.concatenate(parts, 0) for parts in zip(*outs)]

    def body_maps(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, h, w, 3) uint8 BGR -> heatmaps (B, h, w, 19) and PAFs (B, h, w, 38), float64, at the image size."""
        n, h, w = bgr.shape[:3]
        heat, paf = np.zeros((n, h, w, 19)), np.zeros((n, h, w, 38))
        for s in self.body_scales:
            scale = s * BOXSIZE / h
            resized = [pad_to_stride(smart_resize(im, h * scale, w * scale)) for im in bgr]
            out_paf, out_heat = self._forward(self.body, np.stack([r[0] for r in resized]))
            for b, (padded, down, right) in enumerate(resized):
                hp, wp = padded.shape[:2]
                for maps, acc in ((out_heat[b], heat[b]), (out_paf[b], paf[b])):
                    m = maps.transpose(1, 2, 0)
                    m = smart_resize(m, m.shape[0] * STRIDE, m.shape[1] * STRIDE)[: hp - down, : wp - right]
                    acc += smart_resize(m, h, w) / len(self.body_scales)
        return heat, paf

    def hand_maps(self, crops: list[np.ndarray]) -> np.ndarray:
        """Square BGR crops -> (N, 128, 128, 22) float64 heatmaps averaged over `hand_scales` x 368 px (blurred input)."""
        size = 128
        acc = np.zeros((len(crops), size, size, 22))
        blurred = [cv2.GaussianBlur(c, (0, 0), 0.8) for c in crops]
        net = self.network("hand")
        for s in self.hand_scales:
            side = s * BOXSIZE
            resized = [pad_to_stride(smart_resize(c, side, side)) for c in blurred]
            # crops of one scale share a size, so all hands of the chunk go through the network together
            (out,) = self._forward(net, np.stack([r[0] for r in resized]))
            for i, (padded, down, right) in enumerate(resized):
                m = out[i].transpose(1, 2, 0)
                m = smart_resize(m, m.shape[0] * STRIDE, m.shape[1] * STRIDE)
                m = m[: padded.shape[0] - down, : padded.shape[1] - right]
                acc[i] += smart_resize(m, size, size) / len(self.hand_scales)
        return acc

    def face_maps(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """BGR crops -> per crop (71, h, w) float32 heatmaps: the network at `face_size` (384) square, resized back
        bilinearly (align_corners=True, as the reference)."""
        net = self.network("face")
        (out,) = self._forward(net, np.stack([smart_resize(c, self.face_size, self.face_size) for c in crops]))
        res = []
        for o, c in zip(out, crops):
            t = torch.from_numpy(o)[None]
            res.append(F.interpolate(t, c.shape[:2], mode="bilinear", align_corners=True)[0].numpy())
        return res

    # -- the pipeline --

    def find_people(self, rgb: np.ndarray, *, include_hand: bool = False, include_face: bool = False) -> list[list[Person]]:
        """(B, h, w, 3) uint8 RGB at the detect size -> people per image (hands/face only when asked for)."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        n, h, w = bgr.shape[:3]
        heat, paf = self.body_maps(bgr)
        people: list[list[Person]] = []
        pixels: list[list[list[Point]]] = []  # crops are placed in pixels, people are stored in fractions
        for b in range(n):
            candidates, rows = assemble_people(body_peaks(heat[b]), paf[b], h)
            pixels.append([[None if i < 0 else (candidates[i, 0], candidates[i, 1]) for i in r[:18].astype(int)] for r in rows])
            people.append([
                Person(body=[None if p is None else (p[0] / float(w), p[1] / float(h)) for p in pix], score=float(row[18]))
                for pix, row in zip(pixels[-1], rows)
            ])  # fmt: skip

        if include_hand:
            jobs = [(b, k, box) for b in range(n) for k, pix in enumerate(pixels[b]) for box in hand_boxes(pix, h, w)]
            if jobs:
                crops = [bgr[b, y : y + s, x : x + s] for b, _, (x, y, s, _) in jobs]
                for (b, k, (x, y, _, left)), m, c in zip(jobs, self.hand_maps(crops), crops):
                    pts = _to_canvas_fraction(hand_peaks(m, c.shape[0], c.shape[1]), x, y, h, w)
                    if left:
                        people[b][k].left_hand = pts
                    else:
                        people[b][k].right_hand = pts
        if include_face:
            boxes = [(b, k, face_box(pix, h, w)) for b in range(n) for k, pix in enumerate(pixels[b])]
            jobs = [job for job in boxes if job[2] is not None]
            if jobs:
                crops = [bgr[b, y : y + s, x : x + s] for b, _, (x, y, s) in jobs]
                for (b, k, (x, y, _)), m in zip(jobs, self.face_maps(crops)):
                    pk = face_peaks(m)
                    if len(pk):
                        people[b][k].face = _to_canvas_fraction(pk, x, y, h, w)
        return people

    def _run(
        self, images: torch.Tensor, include_body: bool, include_hand: bool, include_face: bool, resolution: int
    ) -> tuple[torch.Tensor, list[dict]]:
        """One clean chunk -> (maps at the input size, JSON dicts)."""
        if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 1:
            raise AnnotatorError(f"openpose: resolution must be a positive whole number of pixels; got {resolution!r}.")
        H, W = images.shape[-2:]
        h, w = detect_size(H, W, int(resolution))
        x = images
        if (h, w) != (H, W):
            x = resize_to(images, h, w, "bicubic" if h * w > H * W else "bilinear").clamp(0, 1)
        rgb = (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for kind, wanted in (("hand", include_hand), ("face", include_face)):
            if wanted:
                self.network(kind)  # a missing or wrong file fails now, not only on images that have people
        with torch.inference_mode():
            people = self.find_people(rgb, include_hand=include_hand, include_face=include_face)
        canvases = [draw_people(p, h, w, body=include_body, hand=include_hand, face=include_face) for p in people]
        maps = torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2).float().div(255.0)
        maps = resize_to(maps, H, W).clamp(0, 1).to(images.device)
        keypoints = [to_openpose_json(p, W, H) for p in people]
        return maps, keypoints

    def annotate(
        self, images: torch.Tensor, include_body: bool = True, include_hand: bool = False, include_face: bool = False, resolution: int = 512
    ) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) pose maps in [0, 1] (black background)."""
        return self._run(images, include_body, include_hand, include_face, resolution)[0]

    def annotate_chunk(
        self, images: torch.Tensor, include_body: bool = True, include_hand: bool = False, include_face: bool = False, resolution: int = 512
    ) -> tuple[torch.Tensor, list[dict]]:
        """One clean chunk -> (pose maps, one OpenPose JSON dict per image)."""
        return self._run(images, include_body, include_hand, include_face, resolution)

    def detect(
        self,
        images: torch.Tensor,
        chunk_size: Optional[int] = None,
        progress: Optional[Callable[[int], None]] = None,
        *,
        include_body: bool = True,
        include_hand: bool = False,
        include_face: bool = False,
        resolution: int = 512,
    ) -> tuple[torch.Tensor, list[dict]]:
        """As calling the annotator, plus one OpenPose JSON dict per image (`to_openpose_json`): (maps, dicts)."""
        return self.run(as_rgb(images, self.name), chunk_size=chunk_size or None, progress=progress, include_body=include_body,
                        include_hand=include_hand, include_face=include_face, resolution=resolution)


# --- registration -----------------------------------------------------------------------------------------

register(
    AnnotatorInfo(
        key="openpose",
        title="OpenPose (body, hands, face)",
        build=lambda paths, device, dtype: OpenPoseDetector.from_file(
            paths[BODY_FILE], paths.get(HAND_FILE), paths.get(FACE_FILE), device=device, dtype=dtype
        ),
        params=[
            Param("include_body", "BOOLEAN", True, tooltip="Draw the 18-point body skeleton."),
            Param("include_hand", "BOOLEAN", False, tooltip="Detect and draw hands (21 points each; uses hand_pose_model.pth, slower)."),
            Param("include_face", "BOOLEAN", False, tooltip="Detect and draw face landmarks (uses facenet.pth)."),
            resolution_param(tooltip="Detection size of the short side; the map is returned at the input size."),
        ],
        weights=[BODY_FILE, HAND_FILE, FACE_FILE],
        switched_weights={HAND_FILE: "include_hand", FACE_FILE: "include_face"},  # body-only needs neither
        keypoints=True,
        description=(
            "CMU OpenPose body, hand and face keypoints drawn in the ControlNet 1.1 openpose colours; "
            "detect() also gives the keypoints as OpenPose JSON."
        ),
        licence=LICENCE,
    ),
    # SHA-256 and sizes as published for lllyasviel/Annotators @982e7ed (the Hugging Face LFS objects)
    Published(BODY_FILE, "25a948c16078b0f08e236bda51a385d855ef4c153598947c28c0d47ed94bb746", 209_267_595),
    Published(HAND_FILE, "b76b00d1750901abd07b9f9d8c98cc3385b8fe834a26d4b4f0aad439e75fc600", 147_341_049),
    Published(FACE_FILE, "8beb52e548624ffcc4aed12af7aee7dcbfaeea420c75609fee999fe7add79d43", 153_718_792),
)
