"""Draws the example input images that the shipped workflows' LoadImage nodes name, into workflows/inputs/.

    python scripts/make_example_inputs.py [--out DIR]

Why drawn and not photographed: every pixel comes from this script, so the images carry the project's own licence
(GPL-3.0-or-later) and nobody has to trust a third-party picture's terms. Each image is 512 x 512 (the SD1.5
resolution the workflows sample at), plain shapes with few colours, so each PNG stays far under 100 KB.
Condition images use the conventions the published ControlNets were trained on: white strokes on black for
scribble, the OpenPose limb colours (drawn by our own OpenPose renderer), near = bright for depth, and exact ADE20K
palette colours (our annotators' palette) for segmentation. Deterministic: rerunning gives the same pixels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the annotators package, for the OpenPose drawing and the ADE20K palette

from annotators.openpose import Person, draw_people  # noqa: E402
from annotators.segmentation import ade20k_palette  # noqa: E402

SIZE = 512
OUT = ROOT / "workflows" / "inputs"

# ADE20K class ids (0-based, the seg ControlNets' order) used in the kitchen map.
WALL, FLOOR, CEILING, WINDOW, CABINET, SINK, REFRIGERATOR, COUNTERTOP, STOVE, KITCHEN_ISLAND, LIGHT, HOOD = (
    0, 3, 5, 8, 10, 47, 50, 70, 71, 73, 82, 133)  # fmt: skip


def vertical_gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB fading from `top` to `bottom`: smooth shading, so Canny sees only object edges."""
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    row = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    return np.broadcast_to(row, (height, width, 3)).round().astype(np.uint8).copy()


def living_room() -> np.ndarray:
    """A photo-like living room (wall, floor, window with sky, sofa, table, lamp, picture) for the Canny workflows."""
    img = vertical_gradient((214, 196, 170), (178, 160, 134), SIZE, SIZE)
    img[360:] = vertical_gradient((120, 84, 56), (88, 58, 38), SIZE - 360, SIZE)  # wooden floor
    for x in range(-200, SIZE + 200, 64):  # floor boards converging to a vanishing point above the image
        cv2.line(img, (256 + (x - 256) // 3, 360), (x, SIZE), (96, 66, 44), 2, cv2.LINE_AA)
    cv2.rectangle(img, (300, 70), (470, 250), (240, 236, 228), -1)  # window frame
    img[80:240, 310:460] = vertical_gradient((120, 170, 230), (200, 222, 240), 160, 150)  # sky
    cv2.circle(img, (420, 120), 18, (255, 244, 200), -1, cv2.LINE_AA)  # sun
    cv2.line(img, (385, 80), (385, 240), (240, 236, 228), 6)
    cv2.line(img, (310, 160), (460, 160), (240, 236, 228), 6)
    cv2.rectangle(img, (60, 90), (200, 190), (90, 70, 50), -1)  # picture frame
    cv2.rectangle(img, (70, 100), (190, 180), (96, 140, 120), -1)
    cv2.fillPoly(img, [np.array([(70, 180), (120, 125), (150, 155), (190, 118), (190, 180)])], (60, 96, 80), cv2.LINE_AA)
    cv2.rectangle(img, (40, 300), (290, 400), (70, 96, 140), -1)  # sofa: seat, back, arms, cushions
    cv2.rectangle(img, (50, 250), (280, 310), (80, 108, 154), -1)
    for x0 in (30, 270):
        cv2.rectangle(img, (x0, 280), (x0 + 30, 400), (60, 84, 126), -1)
    cv2.line(img, (165, 255), (165, 340), (58, 80, 118), 2, cv2.LINE_AA)
    for x in (60, 270):
        cv2.rectangle(img, (x, 400), (x + 12, 420), (40, 30, 24), -1)
    cv2.ellipse(img, (390, 420), (80, 22), 0, 0, 360, (150, 104, 66), -1, cv2.LINE_AA)  # coffee table
    cv2.rectangle(img, (385, 430), (395, 480), (110, 76, 48), -1)
    cv2.ellipse(img, (390, 482), (30, 8), 0, 0, 360, (110, 76, 48), -1, cv2.LINE_AA)
    cv2.rectangle(img, (375, 398), (405, 412), (230, 230, 226), -1)  # a cup
    cv2.line(img, (490, 250), (490, 470), (50, 46, 44), 4)  # floor lamp
    cv2.ellipse(img, (490, 472), (22, 6), 0, 0, 360, (50, 46, 44), -1, cv2.LINE_AA)
    cv2.fillPoly(img, [np.array([(462, 250), (518, 250), (506, 200), (474, 200)])], (246, 226, 170), cv2.LINE_AA)
    return img


def cat_on_fence() -> np.ndarray:
    """A scribble (white strokes on black, as the scribble ControlNet was trained): a cat sitting on a fence."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    white, w = (255, 255, 255), 5
    for x in range(30, SIZE, 90):  # fence pickets with pointed tops
        cv2.polylines(img, [np.array([(x, 500), (x, 330), (x + 25, 300), (x + 50, 330), (x + 50, 500)])], False, white, w, cv2.LINE_AA)
    for y in (360, 450):
        cv2.line(img, (10, y), (502, y), white, w, cv2.LINE_AA)
    cv2.ellipse(img, (250, 250), (70, 80), 0, 0, 360, white, w, cv2.LINE_AA)  # body
    cv2.circle(img, (250, 140), 48, white, w, cv2.LINE_AA)  # head
    for side in (-1, 1):
        cv2.polylines(img, [np.array([(250 + side * 18, 98), (250 + side * 38, 60), (250 + side * 44, 112)])], False, white, w, cv2.LINE_AA)
        cv2.circle(img, (250 + side * 18, 135), 6, white, -1, cv2.LINE_AA)  # eyes
        for dy in (-6, 6):  # whiskers
            cv2.line(img, (250 + side * 20, 158 + dy // 2), (250 + side * 70, 150 + dy), white, 3, cv2.LINE_AA)
    cv2.line(img, (250, 150), (250, 160), white, 4, cv2.LINE_AA)
    tail = np.array([(310, 300), (360, 320), (390, 290), (380, 230), (400, 200)])
    cv2.polylines(img, [tail], False, white, w, cv2.LINE_AA)
    for x in (225, 275):  # front paws over the rail
        cv2.ellipse(img, (x, 330), (18, 10), 0, 0, 360, white, w, cv2.LINE_AA)
    cv2.circle(img, (90, 80), 36, white, w, cv2.LINE_AA)  # the moon
    return img


# One dancing figure, the 18 COCO keypoints as fractions of the canvas: nose, neck, right shoulder/elbow/wrist,
# left shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle, right/left eye, right/left ear. "Right" is
# the person's right, seen on the image's left when the figure faces the viewer.
DANCER = [(0.50, 0.16), (0.50, 0.25), (0.41, 0.25), (0.33, 0.17), (0.28, 0.08), (0.59, 0.25), (0.68, 0.31), (0.78, 0.27),
          (0.45, 0.52), (0.38, 0.68), (0.30, 0.84), (0.55, 0.52), (0.62, 0.67), (0.60, 0.86), (0.48, 0.145), (0.52, 0.145),
          (0.46, 0.16), (0.54, 0.16)]  # fmt: skip


def dancer_pose() -> np.ndarray:
    """An OpenPose body skeleton (the standard limb colours, drawn by our OpenPose renderer) on black."""
    return draw_people([Person(body=[(float(x), float(y)) for x, y in DANCER])], SIZE, SIZE, hand=False, face=False)


def bridge_depth() -> np.ndarray:
    """A depth map (near = bright, far = dark, as the depth annotators write it): ground, a river, an arch bridge."""
    rows = np.arange(SIZE, dtype=float)[:, None] * np.ones((1, SIZE))
    horizon = 190.0
    ground = np.clip(rows - horizon, 0, None) / (SIZE - horizon)
    depth = np.where(rows > horizon, 40 + 215 * ground**1.2, 0.0)  # ground plane
    cols = np.arange(SIZE, dtype=float)[None, :] * np.ones((SIZE, 1))
    bank = np.abs(cols - 256) < (40 + 0.9 * (rows - horizon))  # the river widens towards the viewer
    depth = np.where((rows > horizon) & bank, depth * 0.85, depth)
    bridge = np.zeros((SIZE, SIZE), np.uint8)
    cv2.rectangle(bridge, (40, 200), (472, 300), 255, -1)  # deck and parapet
    cv2.ellipse(bridge, (256, 300), (150, 80), 0, 180, 360, 0, -1)  # the arch's opening
    cv2.rectangle(bridge, (106, 300), (406, 320), 0, -1)
    depth = np.where(bridge > 0, 150.0 - (rows - 200) * 0.1, depth)
    depth = cv2.GaussianBlur(depth.astype(np.float32), (0, 0), 2.0)
    return np.repeat(depth.clip(0, 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def kitchen_segmentation() -> np.ndarray:
    """An ADE20K segmentation map of a kitchen in the exact palette colours (no anti-aliasing: every pixel a class)."""
    label = np.full((SIZE, SIZE), WALL, np.uint8)
    label[:60] = CEILING
    label[380:] = FLOOR
    for cx in (150, 360):
        cv2.ellipse(label, (cx, 60), (40, 14), 0, 0, 360, LIGHT, -1, cv2.LINE_8)
    cv2.rectangle(label, (200, 110), (330, 230), WINDOW, -1)
    cv2.rectangle(label, (20, 90), (180, 200), CABINET, -1)  # wall cabinets
    cv2.rectangle(label, (350, 90), (420, 170), HOOD, -1)
    cv2.rectangle(label, (20, 280), (420, 300), COUNTERTOP, -1)
    cv2.rectangle(label, (20, 300), (420, 390), CABINET, -1)  # base cabinets
    cv2.rectangle(label, (230, 284), (300, 296), SINK, -1)
    cv2.rectangle(label, (340, 270), (410, 284), STOVE, -1)
    cv2.rectangle(label, (430, 100), (500, 390), REFRIGERATOR, -1)
    cv2.fillPoly(label, [np.array([(120, 410), (380, 410), (400, 470), (100, 470)])], KITCHEN_ISLAND, cv2.LINE_8)
    return ade20k_palette().numpy()[label]


def circle_condition() -> np.ndarray:
    """A circle outline, white on black: the fill50k-style condition the training workflow's toy data teaches."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    cv2.circle(img, (256, 256), 150, (255, 255, 255), 3, cv2.LINE_AA)
    return img


# file name (as the workflows' LoadImage nodes name it) -> drawing
EXAMPLES: dict[str, Callable[[], np.ndarray]] = {
    "canny_example.png": living_room,
    "scribble_example.png": cat_on_fence,
    "pose_example.png": dancer_pose,
    "depth_example.png": bridge_depth,
    "segmentation_example.png": kitchen_segmentation,
    "condition_example.png": circle_condition,
}


def write_all(out: Path) -> list[Path]:
    """Draw every example into `out` (our own generated files there are replaced); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in EXAMPLES.items():
        rgb = draw()
        if rgb.shape != (SIZE, SIZE, 3) or rgb.dtype != np.uint8:
            raise AssertionError(f"{name}: drew {rgb.shape} {rgb.dtype}, expected ({SIZE}, {SIZE}, 3) uint8")
        path = out / name
        if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            raise OSError(f"could not write {path}")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"folder to write into (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    for p in write_all(args.out):
        print(f"{p}  {p.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
