"""The README's main command (`make run` -> scripts/run_comfyui.sh) as a real server: object_info, a prompt, history, clean stop."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from host import Graph

ROOT = Path(__file__).resolve().parents[1]
OUR_NODES = {"ControlNetSuiteLoader", "ControlNetSuiteApply", "ControlNetSuiteStack", "ControlNetSuiteApplyStack"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url: str, data: dict):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def server(host, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "models" / "checkpoints").mkdir(parents=True)
    (run_dir / "models" / "controlnet").mkdir(parents=True)
    (run_dir / "custom_nodes").mkdir(parents=True)
    shutil.copy(host.dirs["checkpoints"] / host.checkpoint, run_dir / "models" / "checkpoints")
    shutil.copy(host.dirs["controlnet"] / "cn_a.safetensors", run_dir / "models" / "controlnet")
    (run_dir / "custom_nodes" / "suite_test_nodes").symlink_to(ROOT / "tests" / "comfy_test_nodes", target_is_directory=True)
    port = free_port()
    env = dict(os.environ, CNS_RUN_DIR=str(run_dir), PORT=str(port), VENV=sys.prefix)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run_comfyui.sh")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    info = None
    while time.time() < deadline and proc.poll() is None:
        try:
            info = get(base + "/object_info")
            break
        except OSError:
            time.sleep(1)
    if info is None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("server did not come up:\n" + (tmp_path / "server.log").read_text()[-4000:])
    yield base, info, proc, tmp_path / "server.log", run_dir
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def test_make_run_serves_our_nodes_runs_a_prompt_and_stops_cleanly(server, host):
    base, info, proc, log_path, run_dir = server
    assert OUR_NODES <= set(info), sorted(k for k in info if "Suite" in k)
    assert info["ControlNetSuiteApply"]["category"] == "conditioning/controlnet"
    log = log_path.read_text()
    ours = [l for l in log.splitlines() if "controlnet_suite" in l]
    assert ours and not [l for l in ours if "IMPORT FAILED" in l or "Cannot import" in l], ours  # ComfyUI's own extras may fail; we may not
    assert str(run_dir / "models") in log  # it tells the user where the models go

    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=host.checkpoint)
    pos = g.add("SuiteTestConditioning", seed=1, width=768)
    neg = g.add("SuiteTestConditioning", seed=2, width=768)
    cn = g.add("ControlNetSuiteLoader", control_net_name="cn_a.safetensors")
    img = g.add("SuiteTestImage", width=64, height=64, channels=3, batch=1, seed=0)
    ap = g.add("ControlNetSuiteApply", positive=(pos, 0), negative=(neg, 0), control_net=(cn, 0), image=(img, 0), strength=1.0,
               start_percent=0.0, end_percent=1.0, control_mode="balanced", resize_mode="crop and resize")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=(ckpt, 0), seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
               positive=(ap, 0), negative=(ap, 1), latent_image=(lat, 0), denoise=1.0)
    dec = g.add("VAEDecode", samples=(ks, 0), vae=(ckpt, 2))
    g.add("SaveImage", images=(dec, 0), filename_prefix="server_test")
    pid = post(base + "/prompt", {"prompt": g.prompt, "client_id": "test"})["prompt_id"]
    deadline = time.time() + 180
    hist = {}
    while time.time() < deadline:
        hist = get(base + f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    entry = hist[pid]
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images and (run_dir / "output" / images[0]["filename"]).is_file()

    if host.new:  # ComfyUI 0.8 lists custom nodes' workflows/ in its template browser
        templates = get(base + "/workflow_templates")
        assert "controlnet_suite" in templates and "canny" in templates["controlnet_suite"], templates

    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) is not None
