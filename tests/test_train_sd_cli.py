"""`python -m controlnet_core.train sd`: a real process trains on tiny SD1.x- and SDXL-layout checkpoints written here;
the result loads in our loader and ComfyUI's; bad bases stop with exit code 2 and a message naming the problem."""
import os
import re
import subprocess
import sys

import pytest
import torch
from base_factories import TOKENIZER_DIR, sd1_checkpoint, sd2_checkpoint, sdxl_checkpoint
from factories import rel_err, save
from safetensors.torch import load_file

from controlnet_core import create_from_unet, load_control
from controlnet_core.base_models import load_base_model
from controlnet_core.train import ControlDataset, TrainConfig, Trainer
from controlnet_core.train.__main__ import main
from controlnet_core.train.toy import make_fill50k

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
PROGRESS = re.compile(r"step (\d+)/(\d+)  loss \d+\.\d{4}  \d+ ms/step  [\d.]+ img/s")


def sd_cli(*args, env=ENV):
    cmd = [sys.executable, "-m", "controlnet_core.train", "sd", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def one_thread():
    """Train in-process on one thread, as the CLI runs here (OMP_NUM_THREADS=1): on a busy 2-core machine two
    threads can be many times slower, and the comparison with the CLI's weights stays closest."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("data"), n=4, size=64)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_trains_from_a_single_file_checkpoint(comfy, tmp_path, data, family, one_thread):
    import comfy.controlnet

    ckpt = tmp_path / f"{family}.safetensors"
    (sd1_checkpoint if family == "sd1" else sdxl_checkpoint)(ckpt)
    out = tmp_path / "run"
    common = ("--base", ckpt, "--data", data, "--out", out, "--batch", 2, "--resolution", 64, "--lr", 1e-3, "--tokenizer", TOKENIZER_DIR)
    r = sd_cli(*common, "--steps", 2, "--save-every", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m.groups() for m in PROGRESS.finditer(r.stdout)] == [("1", "2"), ("2", "2")], r.stdout
    path = out / "controlnet.safetensors"
    sd = load_file(path)
    assert sd and all(k.startswith("control_model.") for k in sd)  # the v1.1 layout
    assert sd["control_model.zero_convs.0.0.weight"].abs().sum() > 0  # trained: the zero convs moved

    base = load_base_model(ckpt, tokenizer=TOKENIZER_DIR, image_size=(64, 64))
    cfg = load_control(path).config
    ucfg = base.unet.config.encoder
    assert (cfg.context_dim, cfg.adm_in_channels, cfg.channel_mult) == (ucfg.context_dim, ucfg.adm_in_channels, ucfg.channel_mult)
    assert comfy.controlnet.load_controlnet(str(path)) is not None

    # the command trains what the library API trains with the same settings (same weights up to float reassociation)
    cn = create_from_unet(base.unet.state_dict(), seed=0)
    trainer = Trainer(base.unet, cn, base.text, base.vae, ControlDataset(data, size=64), TrainConfig(lr=1e-3, batch_size=2))
    trainer.train(2)
    for k, v in cn.state_dict().items():
        assert rel_err(sd["control_model." + k], v) <= 1e-4, k

    if family == "sdxl":  # --cache-dir: (context, y) pairs and latents cached; the same weights, cached or read back
        cache = tmp_path / "cache"
        for run in ("cached", "from_cache"):
            args = list(common)
            args[args.index("--out") + 1] = tmp_path / run
            r = sd_cli(*args, "--steps", 2, "--cache-dir", cache)
            assert r.returncode == 0, r.stderr[-3000:]
            got = load_file(tmp_path / run / "controlnet.safetensors")
            assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), run
        entries = list((cache / "text").rglob("*.safetensors"))
        assert entries and all(set(load_file(e)) == {"value", "y"} for e in entries)
        assert any((cache / "latents").rglob("*.safetensors"))

    if family == "sd1":  # resume continues from the saved step
        r = sd_cli(*common, "--steps", 3, "--resume")
        assert r.returncode == 0 and "resumed at step 2" in r.stdout, r.stderr[-3000:]
        assert [m.groups() for m in PROGRESS.finditer(r.stdout)] == [("3", "3")]


@pytest.fixture(scope="module")
def sd1_tensors(tmp_path_factory, comfy):
    path = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    sd1_checkpoint(path)
    return load_file(path)


def run_main(capsys, *args) -> tuple[int, str]:
    rc = main(["sd", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_bad_bases_stop_with_a_clear_message(tmp_path, data, sd1_tensors, capsys, monkeypatch):
    out = tmp_path / "out"
    common = ("--data", data, "--out", out, "--steps", 1, "--resolution", 64)
    sd3 = save(tmp_path / "sd3.safetensors", {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(4),
                                              "model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4)})
    rc, text = run_main(capsys, "--base", sd3, *common)
    assert rc == 2 and "Stable Diffusion 3" in text and str(sd3) in text
    no_vae = save(tmp_path / "no_vae.safetensors", {k: v for k, v in sd1_tensors.items() if not k.startswith("first_stage_model.")})
    rc, text = run_main(capsys, "--base", no_vae, "--tokenizer", TOKENIZER_DIR, *common)
    assert rc == 2 and "missing VAE" in text
    no_text = save(tmp_path / "no_text.safetensors", {k: v for k, v in sd1_tensors.items() if not k.startswith("cond_stage_model.")})
    rc, text = run_main(capsys, "--base", no_text, "--tokenizer", TOKENIZER_DIR, *common)
    assert rc == 2 and "missing text encoder" in text
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    full = save(tmp_path / "sd1.safetensors", sd1_tensors)
    rc, text = run_main(capsys, "--base", full, *common)
    assert rc == 2 and "no CLIP tokenizer files" in text and "--tokenizer DIR" in text
    assert not out.exists()  # nothing was trained or written


def test_sd2_single_files_need_the_prediction_type(comfy, tmp_path, data, capsys, one_thread):
    ckpt = tmp_path / "sd2.safetensors"
    sd2_checkpoint(ckpt)
    common = ("--base", ckpt, "--data", data, "--out", tmp_path / "out", "--resolution", 64, "--batch", 2, "--tokenizer", TOKENIZER_DIR)
    rc, text = run_main(capsys, *common, "--steps", 1)
    assert rc == 2 and "--prediction eps" in text and "--prediction v" in text
    rc, text = run_main(capsys, *common, "--steps", 0, "--prediction", "v")
    assert rc == 0 and "SD2.x" in text and "v-prediction" in text and (tmp_path / "out" / "controlnet.safetensors").is_file()
