"""The shipped example images: one for every LoadImage in every workflow, drawn by our own script (so under our
licence), small, in the conventions their ControlNets expect, and put into `make run`'s input folder without ever
replacing a file of the user's."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "workflows" / "inputs"
SHIPPED = sorted(INPUTS.glob("*.png"))
MAKE = ROOT / "scripts" / "make_example_inputs.py"
PLACE = ROOT / "scripts" / "place_example_inputs.py"


def load_image_names() -> set[str]:
    """The file names of every LoadImage node in every shipped workflow."""
    names = set()
    for wf in (ROOT / "workflows").glob("*.json"):
        names |= {n["widgets_values"][0] for n in json.loads(wf.read_text())["nodes"] if n["type"] == "LoadImage"}
    return names


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_every_workflow_image_is_shipped_and_nothing_else():
    names = load_image_names()
    assert names, "no LoadImage in the workflows?"
    assert names == {p.name for p in SHIPPED}
    readme = (INPUTS / "README.md").read_text()
    assert "scripts/make_example_inputs.py" in readme and "GPL-3.0-or-later" in readme  # the licence, stated


def test_examples_are_small_512px_rgb_pngs():
    for p in SHIPPED:
        assert p.stat().st_size < 100 * 1024, p.name
        with Image.open(p) as im:
            assert (im.format, im.size, im.mode) == ("PNG", (512, 512), "RGB"), p.name


def test_shipped_examples_are_what_our_script_draws(tmp_path):
    r = subprocess.run([sys.executable, str(MAKE), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in tmp_path.glob("*.png")} == {p.name for p in SHIPPED}
    for p in SHIPPED:
        # equal up to anti-aliasing differences between OpenCV versions; rerun the script if its drawing changes
        diff = np.abs(rgb(p).astype(int) - rgb(tmp_path / p.name).astype(int)).mean()
        assert diff < 0.5, f"{p.name} differs from scripts/make_example_inputs.py's drawing ({diff:.2f}): rerun the script"


def test_condition_images_follow_their_controlnets_conventions():
    from annotators.openpose import BODY_COLORS
    from annotators.segmentation import ade20k_palette

    seg = rgb(INPUTS / "segmentation_example.png").reshape(-1, 3)
    palette = {tuple(c) for c in ade20k_palette().tolist()}
    colours = {tuple(c) for c in np.unique(seg, axis=0).tolist()}
    assert colours <= palette and len(colours) >= 8  # exact ADE20K class colours only, no blended edges
    pose = rgb(INPUTS / "pose_example.png").reshape(-1, 3)
    present = {tuple(c) for c in np.unique(pose, axis=0).tolist()}
    assert {tuple(c) for c in BODY_COLORS} <= present  # all 18 joints in the OpenPose colours
    scribble = rgb(INPUTS / "scribble_example.png")
    assert scribble[0, 0].tolist() == [0, 0, 0] and (scribble == 255).all(axis=2).mean() > 0.02  # white strokes on black
    depth = rgb(INPUTS / "depth_example.png").astype(int)
    assert (depth[..., 0] == depth[..., 1]).all() and depth[-1].mean() > depth[220].mean() > depth[0].mean()  # near = bright


def place(dest: Path) -> subprocess.CompletedProcess:
    """The placement exactly as scripts/run_comfyui.sh calls it."""
    return subprocess.run([sys.executable, str(PLACE), str(dest)], capture_output=True, text=True, timeout=60)


def test_place_copies_what_is_missing_and_never_replaces_a_users_file(tmp_path):
    dest = tmp_path / "input"
    dest.mkdir()
    mine = b"my own picture, not a PNG at all"
    (dest / "canny_example.png").write_bytes(mine)
    (dest / "pose_example.png").symlink_to(tmp_path / "elsewhere.png")  # a dangling link: must not be written through
    r = place(dest)
    assert r.returncode == 0, r.stderr
    assert (dest / "canny_example.png").read_bytes() == mine
    assert (dest / "pose_example.png").is_symlink() and not (tmp_path / "elsewhere.png").exists()
    for p in SHIPPED:
        if p.name not in ("canny_example.png", "pose_example.png"):
            assert (dest / p.name).read_bytes() == p.read_bytes(), p.name
    assert "canny_example.png" not in r.stdout and "scribble_example.png" in r.stdout
    (dest / "scribble_example.png").write_bytes(mine)  # the user edits our copy: a later run keeps the edit
    again = place(dest)
    assert again.returncode == 0 and again.stdout == ""
    assert (dest / "scribble_example.png").read_bytes() == mine


def test_make_run_serves_the_examples_and_keeps_the_users_file(tmp_path):
    """The real `make run` server: the examples are in its input folder and LoadImage offers them; the user's own
    file of an example's name is still theirs."""
    from comfy_server import ComfyServer

    run = tmp_path / "run"
    (run / "input").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(run / "input" / "depth_example.png")
    before = (run / "input" / "depth_example.png").read_bytes()
    with ComfyServer(run, test_nodes=False) as srv:
        choices = srv.object_info["LoadImage"]["input"]["required"]["image"]
        options = choices[0] if isinstance(choices[0], list) else choices[1]["options"]
        assert {p.name for p in SHIPPED} <= set(options)
        served = srv.get("/view?filename=scribble_example.png&type=input")
        assert served == (INPUTS / "scribble_example.png").read_bytes()
    assert (run / "input" / "depth_example.png").read_bytes() == before
    assert (run / "input" / "canny_example.png").read_bytes() == (INPUTS / "canny_example.png").read_bytes()
