"""The training command as a real process: killed with SIGKILL it resumes to the same weights; Ctrl-C saves."""
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def cli(*args):
    return [sys.executable, "-m", "controlnet_core.train", *map(str, args)]


def saved_step(ckpt):
    try:
        return torch.load(ckpt, weights_only=True)["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def wait_for_step(ckpt, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if saved_step(ckpt) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} (process exit code {proc.poll()})")


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    data = tmp_path / "data"
    subprocess.run(cli("toy-data", data, "--n", 16), check=True, env=ENV, capture_output=True)
    common = ("--steps", 10, "--batch", 2, "--lr", 1e-3)
    subprocess.run(cli("toy", data, "--out", tmp_path / "straight", "--save-every", 100, *common), check=True, env=ENV, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli("toy", data, "--out", out, "--save-every", 1, *common), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(out / "checkpoint.pt", 3, proc)
    proc.kill()
    proc.wait()
    killed_at = saved_step(out / "checkpoint.pt")
    assert 3 <= killed_at < 10 and not (out / "controlnet.safetensors").exists()
    r = subprocess.run(cli("toy", data, "--out", out, "--save-every", 1, "--resume", *common), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and f"resumed at step {killed_at}" in r.stdout, r.stderr[-2000:]
    a, b = load_file(tmp_path / "straight" / "controlnet.safetensors"), load_file(out / "controlnet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_stops(tmp_path):
    data = tmp_path / "data"
    subprocess.run(cli("toy-data", data, "--n", 8), check=True, env=ENV, capture_output=True)
    out = tmp_path / "run"
    proc = subprocess.Popen(cli("toy", data, "--out", out, "--steps", 500, "--batch", 2, "--save-every", 2), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(out / "checkpoint.pt", 2, proc)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-2000:]
    step = saved_step(out / "checkpoint.pt")
    assert 2 <= step < 500 and (out / "controlnet.safetensors").is_file()
    assert "loss" in stdout and "img/s" in stdout
