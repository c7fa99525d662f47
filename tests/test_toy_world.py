"""The toy world: controllability metric, base-training mode, step-0 identity through the sampler, the shipped
demo models (our loader and ComfyUI's), and the demo script end to end."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controlnet_core import create_from_unet, load_control
from controlnet_core.train import ControlDataset, TrainConfig, Trainer
from controlnet_core.train.toy_metrics import condition_shape_mask, controllability, generated_shape_mask, iou
from controlnet_core.train.toy_sample import load_toy_base, sample
from controlnet_core.train.toy_world import (
    IMAGE_SIZE,
    TOY_BASE_UNET,
    ToyPromptEncoder,
    decode_latent,
    draw_pair,
    encode_image,
    make_toy_world,
    prompt_for,
)
from controlnet_core.unet import UNetModel

ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = ROOT / "demo" / "toy_base.safetensors"
DEMO_CN = ROOT / "demo" / "toy_controlnet.safetensors"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests are small: one thread each is faster than two fighting over a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pair(centre, radius, fg="red", bg="blue"):
    cond, tgt = draw_pair(centre, radius, fg, bg)
    return torch.from_numpy(cond).permute(2, 0, 1).float() / 255, torch.from_numpy(tgt).permute(2, 0, 1).float() / 255


# -- the controllability score --

def test_iou_of_hand_made_masks():
    a = torch.zeros(4, 10, 10, dtype=torch.bool)
    b = torch.zeros(4, 10, 10, dtype=torch.bool)
    a[0, 0:5, 0:5] = True  # 25 px
    b[0, 2:7, 2:7] = True  # 25 px, overlapping 3x3 = 9: IoU 9 / 41
    a[1, 0:2, 0:2] = True
    b[1, 5:7, 5:7] = True  # disjoint: 0
    a[2, 1:9, 1:9] = True
    b[2, 1:9, 1:9] = True  # equal: 1
    # item 3: both empty: 1 by definition
    assert torch.allclose(iou(a, b), torch.tensor([9 / 41, 0.0, 1.0, 1.0]))


def test_condition_mask_is_the_outline_and_its_inside():
    hint = torch.zeros(1, 3, 12, 12)
    hint[0, :, 2, 2:9] = hint[0, :, 8, 2:9] = 1.0  # a 7x7 square outline
    hint[0, :, 2:9, 2] = hint[0, :, 2:9, 8] = 1.0
    expected = torch.zeros(1, 12, 12, dtype=torch.bool)
    expected[0, 2:9, 2:9] = True
    assert torch.equal(condition_shape_mask(hint), expected)
    hint[0, :, 8, 5] = 0.0  # a gap: the outline no longer encloses anything
    assert condition_shape_mask(hint).sum() == 7 * 4 - 4 - 1


def test_generated_mask_splits_pixels_between_border_colour_and_most_frequent_other_colour():
    img = torch.zeros(2, 3, 16, 16)
    img[:, 2] = 1.0  # blue background (the border's colour)
    img[0, :, 4:10, 5:12] = torch.tensor([0.9, 0.1, 0.05])[:, None, None]  # a noisy red block: the foreground colour
    rgb = {(12, 2): (0.6, 0.0, 0.4), (12, 3): (0.4, 0.0, 0.6), (13, 2): (1.0, 1.0, 0.0)}
    for (y, x), c in rgb.items():  # a red-ish mix, a blue-ish mix, and a yellow pixel (nearer red than blue)
        img[0, :, y, x] = torch.tensor(c)
    img[0, :, 0, 0] = 1.0  # one white border pixel does not win the border vote
    expected = torch.zeros(2, 16, 16, dtype=torch.bool)
    expected[0, 4:10, 5:12] = True
    expected[0, 12, 2] = expected[0, 13, 2] = True
    # item 1 is all blue: no foreground colour, an empty shape
    assert torch.equal(generated_shape_mask(img), expected)


def test_controllability_of_drawn_circles_matches_the_geometry():
    hint, target = pair((64, 64), 30)
    assert controllability(target[None], hint[None]).item() == 1.0  # the target fills exactly what the outline encloses
    # shifted by d = 20 px: the lens area of two circles of radius r gives the IoU analytically
    _, shifted = pair((84, 64), 30)
    r, d = 30.0, 20.0
    lens = 2 * r * r * math.acos(d / (2 * r)) - d / 2 * math.sqrt(4 * r * r - d * d)
    expected = lens / (2 * math.pi * r * r - lens)
    assert controllability(shifted[None], hint[None]).item() == pytest.approx(expected, abs=0.02)
    # the toy "VAE" keeps the shape: encode -> decode loses less than a tenth of the IoU on a circle this size
    rec = (decode_latent(encode_image(target[None] * 2 - 1)) + 1) / 2
    assert controllability(rec, hint[None]).item() > 0.9


def test_prompts_are_read_in_order():
    enc = ToyPromptEncoder()
    a, b = enc([prompt_for("red", "blue"), prompt_for("blue", "red")])
    assert not torch.allclose(a, b)  # same words, other order: other embeddings
    assert torch.equal(enc([""])[0], enc(["unknownword"])[0])  # unknown words are padding


# -- the Trainer's base mode (controlnet=None) and ControlNet mode on the toy world --

def _toy_trainer(root, controlnet: bool, config=None):
    torch.manual_seed(0)
    unet = UNetModel(TOY_BASE_UNET)
    cn = create_from_unet(unet.state_dict(), seed=0) if controlnet else None
    config = config or TrainConfig(lr=1e-3, batch_size=2, prediction="v")
    data = ControlDataset(root if (root / "prompt.json").is_file() else make_toy_world(root, n=4))
    return Trainer(unet, cn, ToyPromptEncoder(), encode_image, data, config)


def test_base_mode_trains_every_unet_parameter(tmp_path):
    tr = _toy_trainer(tmp_path / "w", controlnet=False)
    before = {k: v.clone() for k, v in tr.unet.named_parameters()}
    tr.train_step()
    unchanged = [k for k, v in tr.unet.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged  # every weight of the UNet moved, the ones that would be locked for a ControlNet included
    assert all(p.requires_grad for p in tr.unet.parameters())
    with pytest.raises(Exception, match="base UNet"):
        tr.export_controlnet()


def test_controlnet_mode_trains_only_controlnet_parameters(tmp_path):
    tr = _toy_trainer(tmp_path / "w", controlnet=True)
    unet_before = {k: v.clone() for k, v in tr.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in tr.controlnet.state_dict().items()}
    tr.train_step()
    tr.train_step()
    assert all(torch.equal(v, tr.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(p.grad is None for p in tr.unet.parameters())
    moved = [k for k, v in tr.controlnet.state_dict().items() if not torch.equal(v, cn_before[k])]
    assert any(k.startswith("zero_convs") for k in moved) and any(k.startswith("input_blocks") for k in moved)


def test_base_mode_resumes_bit_for_bit(tmp_path):
    cfg = TrainConfig(lr=1e-3, batch_size=2, prediction="v", ema_decay=0.9)
    straight = _toy_trainer(tmp_path / "w", controlnet=False, config=cfg)
    straight.train(3)
    first = _toy_trainer(tmp_path / "w", controlnet=False, config=cfg)
    first.train(2, checkpoint=tmp_path / "ckpt.pt")
    resumed = _toy_trainer(tmp_path / "w", controlnet=False, config=cfg)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    resumed.train(1)
    for (k, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.weights().values(), resumed.ema.weights().values()))


# -- sampling: a ControlNet fresh from create_from_unet changes nothing --

def test_step0_controlnet_leaves_sampling_bit_identical():
    torch.manual_seed(3)
    unet = load_toy_base(DEMO_BASE) if DEMO_BASE.is_file() else UNetModel(TOY_BASE_UNET).eval()
    hints = torch.stack([pair((40 + 10 * i, 64), 20 + 5 * i)[0] for i in range(3)])
    prompts = [prompt_for("red", "blue"), prompt_for("green", "white"), ""]
    kw = dict(steps=4, cfg=3.0, prediction="v", seed=1)
    plain = sample(unet, None, hints, prompts, **kw)
    controlled = sample(unet, create_from_unet(unet.state_dict(), seed=0), hints, prompts, **kw)
    assert torch.equal(plain, controlled)
    # and the comparison can fail: one non-zero weight in a zero conv changes the samples
    cn = create_from_unet(unet.state_dict(), seed=0)
    with torch.no_grad():
        cn.middle_block_out[0].bias.fill_(0.5)
    assert not torch.equal(plain, sample(unet, cn, hints, prompts, **kw))


# -- the shipped demo models --

def test_shipped_models_are_small_and_load_in_our_loader_and_comfys(comfy):
    """The shipped ControlNet is a plain v1.1 ldm file: ComfyUI's built-in loader takes every tensor of it, and
    ComfyUI's own cldm ControlNet built with the toy's architecture gives our residuals from those weights.

    The built-in loader's model is not compared output for output: the file does not store the attention head
    count, and ComfyUI, which recognises SD1.x/SD2.x/SDXL sizes only, builds a size it does not know with one
    64-wide head where the toy has eight (SD1.x's rule). Real SD checkpoints are recognised and need no guess."""
    import comfy.controlnet
    from factories import comfy_cldm, comfy_control_outputs, inputs, rel_err
    from safetensors.torch import load_file

    assert DEMO_BASE.stat().st_size + DEMO_CN.stat().st_size <= 25 * 2**20
    unet = load_toy_base(DEMO_BASE)
    assert unet.config == TOY_BASE_UNET
    ours = load_control(str(DEMO_CN), dtype=torch.float32)
    assert ours.format == "ldm-v1.1" and ours.config.model_channels == TOY_BASE_UNET.encoder.model_channels
    assert (ours.config.num_heads, ours.config.num_head_channels) == (TOY_BASE_UNET.encoder.num_heads, TOY_BASE_UNET.encoder.num_head_channels)
    stored = {k.removeprefix("control_model."): v for k, v in load_file(str(DEMO_CN)).items()}
    builtin = comfy.controlnet.load_controlnet(str(DEMO_CN)).control_model.state_dict()
    assert set(builtin) == set(stored)  # every tensor is taken, none is missing
    assert all(torch.equal(builtin[k].float(), v.float()) for k, v in stored.items())
    theirs = comfy_cldm(ours.config)
    theirs.load_state_dict({k: v.float() for k, v in stored.items()}, strict=True)
    args = inputs(ours.config, batch=2, latent=IMAGE_SIZE // 8, tokens=8)
    with torch.no_grad():
        res = ours.residuals(*args)
        down, mid = comfy_control_outputs(theirs, *args)
    assert len(down) == len(res.down)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(res.down, down)) and rel_err(res.mid, mid) <= 1e-5
    assert res.mid.abs().max() > 0  # trained: the residuals are not the zero of a fresh copy


# -- the demo, end to end --

def test_demo_runs_and_the_shipped_controlnet_beats_the_base_model(tmp_path):
    out = tmp_path / "demo.png"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "demo.py"), "--n", "6", "--steps", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "CNS_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    import re

    base = float(re.search(r"base model alone:\s+([0-9.]+)", proc.stdout).group(1))
    controlled = float(re.search(r"base \+ ControlNet:\s+([0-9.]+)", proc.stdout).group(1))
    assert controlled > base + 0.2, proc.stdout  # the ControlNet puts the shape where the outline is
    import cv2

    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] > 6 * IMAGE_SIZE and img.shape[0] > 3 * IMAGE_SIZE


def test_toy_retrain_runs_every_stage(tmp_path):
    """`make toy-retrain` at the tests' sizes: dataset, base, step-0 identity, the three ControlNet runs, scores,
    training cost, plots and demo image, all into tmp_path; the step-0 identity holds on the freshly trained base."""
    import json
    import os

    out = {k: tmp_path / k for k in ("work", "results", "plots")}
    cmd = [sys.executable, str(ROOT / "experiments" / "retrain.py"), "--quick", *sum(([f"--{k}", str(v)] for k, v in out.items()), []),
           "--base", str(tmp_path / "base.safetensors"), "--controlnet", str(tmp_path / "cn.safetensors")]
    env = {**os.environ, "CNS_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {p.stem for p in out["results"].glob("*.json")}
    assert {"base", "step0", "controlnet_zero50", "controlnet_random50", "controlnet_zero0", "base_alone", "training_cost",
            "retrain_time"} <= results
    assert {p.name for p in out["plots"].glob("*.png")} == {"sudden_convergence.png", "ablation.png", "training_cost.png",
                                                            "base_loss.png", "demo.png"}
    step0 = json.loads((out["results"] / "step0.json").read_text())
    assert step0["zero_convs_bitwise_equal"] and step0["random_convs_max_abs_diff"] > 0
    cost = json.loads((out["results"] / "training_cost.json").read_text())
    assert set(cost["runs"]["toy"]) == {"full", "controlnet", "controlnet_gc"}
    assert load_control(str(tmp_path / "cn.safetensors")).format == "ldm-v1.1"
    assert (out["work"] / "complete.json").is_file()  # marks the run complete: the next one starts over
