"""`make run`'s real server (scripts/run_comfyui.sh) on a free loopback port, for the tests that need one.

The server is the README's main command as a user starts it, with its run folder (models, input, output, user) in a
temporary directory, the tests' tiny models copied in and the test-only nodes linked into its custom_nodes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One `make run` server process. Use as a context manager, or call start()/kill() yourself."""

    def __init__(self, run_dir: Path, models: dict[str, list[Path]] | None = None, test_nodes: bool = True, extra_env: dict | None = None):
        self.run_dir = Path(run_dir)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.run_dir / "server.log"
        for folder, files in (models or {}).items():
            dest = self.run_dir / "models" / folder
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dest)
        (self.run_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
        if test_nodes:
            link = self.run_dir / "custom_nodes" / "suite_test_nodes"
            if not link.exists():
                link.symlink_to(ROOT / "tests" / "comfy_test_nodes", target_is_directory=True)
        self.env = dict(os.environ, CNS_RUN_DIR=str(self.run_dir), PORT=str(self.port), VENV=sys.prefix, PYTHONUNBUFFERED="1", **(extra_env or {}))
        if os.environ.get("COMFYUI_PATH"):  # run_comfyui.sh leaves a user's own ComfyUI its models folder; a test never writes there
            self.env.setdefault("CNS_MODELS_DIR", str(self.run_dir / "models"))
        self.proc: subprocess.Popen | None = None
        self.object_info: dict = {}

    # -- life cycle --

    def start(self, timeout: float = 300) -> "ComfyServer":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run_comfyui.sh")], cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                self.object_info = self.get("/object_info")
                return self
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise AssertionError(f"server did not come up within {timeout:.0f} s:\n" + self.log()[-4000:])

    def interrupt(self) -> None:
        """SIGINT (Ctrl+C in the terminal) to the server's process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "ComfyServer":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP --

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if "json" in r.headers.get("Content-Type", "") else body

    def post(self, path: str, data: dict, timeout: float = 30):
        """POST JSON; returns (status, parsed body): ComfyUI answers an invalid prompt with 400 and a JSON error."""
        req = urllib.request.Request(self.base + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict, client_id: str = "test") -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {body}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a finished prompt."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                return hist[prompt_id]
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n" + self.log()[-4000:])


def sampling_prompt(checkpoint: str, steps: int, control_net: str = "cn_a.safetensors", prefix: str = "server_test") -> dict:
    """Our loader and apply node in front of ComfyUI's KSampler, 64 px, saved: the servers' standard prompt (the test
    nodes give conditioning and the image)."""
    from host import Graph

    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=checkpoint)
    pos = g.add("SuiteTestConditioning", seed=1, width=768)
    neg = g.add("SuiteTestConditioning", seed=2, width=768)
    cn = g.add("ControlNetSuiteLoader", control_net_name=control_net)
    img = g.add("SuiteTestImage", width=64, height=64, channels=3, batch=1, seed=0)
    ap = g.add("ControlNetSuiteApply", positive=(pos, 0), negative=(neg, 0), control_net=(cn, 0), image=(img, 0), strength=1.0,
               start_percent=0.0, end_percent=1.0, control_mode="balanced", resize_mode="crop and resize")
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.add("KSampler", model=(ckpt, 0), seed=3, steps=steps, cfg=5.0, sampler_name="euler", scheduler="normal",
               positive=(ap, 0), negative=(ap, 1), latent_image=(lat, 0), denoise=1.0)
    dec = g.add("VAEDecode", samples=(ks, 0), vae=(ckpt, 2))
    g.add("SaveImage", images=(dec, 0), filename_prefix=prefix)
    return g.prompt
