"""The README's main command (`make run` -> scripts/run_comfyui.sh) as a real server: version and frontend, our nodes,
a prompt, the template listing, and a clean stop on Ctrl+C."""
import importlib.metadata
import re
import time
from pathlib import Path

import pytest
from comfy_host import comfy_root, host_name, is_oldest_host
from comfy_server import ComfyServer, sampling_prompt

ROOT = Path(__file__).resolve().parents[1]
OUR_NODES = {"ControlNetSuiteLoader", "ControlNetSuiteApply", "ControlNetSuiteStack", "ControlNetSuiteApplyStack"}


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("run"), models={"checkpoints": [host.dirs["checkpoints"] / host.checkpoint],
                                                              "controlnet": [host.dirs["controlnet"] / "cn_a.safetensors"]})
    with srv.start():
        yield srv


def host_version() -> str:
    """The version the host's own files declare (0.3.75 and later have comfyui_version.py)."""
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", (comfy_root() / "comfyui_version.py").read_text())
    assert found, "comfyui_version.py declares no __version__"
    return found[1]


@pytest.mark.compat
def test_our_nodes_load_and_the_user_is_told_where_models_go(server):
    assert OUR_NODES <= set(server.object_info), sorted(k for k in server.object_info if "Suite" in k)
    assert server.object_info["ControlNetSuiteApply"]["category"] == "conditioning/controlnet"
    log = server.log()
    ours = [l for l in log.splitlines() if "controlnet_suite" in l]
    assert ours and not [l for l in ours if "IMPORT FAILED" in l or "Cannot import" in l], ours  # ComfyUI's own extras may fail; we may not
    assert str(server.run_dir / "models") in log


@pytest.mark.skipif(is_oldest_host(), reason="ComfyUI a28a9dc (March 2024) reports no version and bundles its own 2024 frontend")
def test_the_server_reports_its_version_and_serves_the_frontend_package(server):
    stats = server.get("/api/system_stats")  # what the frontend's About panel and version checks read
    version = stats["system"]["comfyui_version"]
    assert version == host_version()
    if host_name() == "0.3.75":
        assert version == "0.3.75"
    page = server.get("/")
    import comfyui_frontend_package

    index = Path(comfyui_frontend_package.__file__).parent / "static" / "index.html"
    assert page == index.read_bytes()  # the pip frontend package's page, not a bundled web/ folder
    assert stats["system"]["required_frontend_version"] == importlib.metadata.version("comfyui-frontend-package")


@pytest.mark.compat
def test_a_prompt_with_our_nodes_runs_to_an_image(server, host):
    entry = server.wait(server.queue(sampling_prompt(host.checkpoint, steps=2)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images and (server.run_dir / "output" / images[0]["filename"]).is_file()


@pytest.mark.skipif(is_oldest_host(), reason="ComfyUI a28a9dc has no template browser")
def test_our_workflows_are_listed_in_the_template_browser(server):
    templates = server.get("/api/workflow_templates")
    ours = {Path(p).stem for p in (ROOT / "workflows").glob("*.json")}
    assert "controlnet_suite" in templates and ours <= set(templates["controlnet_suite"]), templates


def assert_stopped_cleanly(server: ComfyServer) -> None:
    """Exit status 0, the host's own "Stopped server" line, and neither an abort nor our launcher's forced exit.
    The wait is a hang guard, not a timing check: the stop takes about 0.2 s (bench/bench_server_stop.py)."""
    rc = server.proc.wait(timeout=300)
    log = server.log()
    assert rc == 0, f"exit status {rc}:\n" + log[-3000:]
    assert "Stopped server" in log and "forcing exit" not in log and "terminate called" not in log, log[-3000:]


@pytest.mark.compat
def test_ctrl_c_stops_an_idle_server(tmp_path):
    with ComfyServer(tmp_path, test_nodes=False) as srv:
        srv.interrupt()
        assert_stopped_cleanly(srv)


@pytest.mark.compat
def test_ctrl_c_during_a_prompt_cancels_it_and_stops_the_server(server, host):
    """Last in this module: it stops the shared server. Without scripts/comfy_main.py the host aborts here
    ("terminate called without an active exception", exit -6): its worker thread is still in torch at exit."""
    saved = set((server.run_dir / "output").glob("*.png"))
    server.queue(sampling_prompt(host.checkpoint, steps=10_000))
    deadline = time.time() + 300
    while "it/s]" not in server.log() and "s/it]" not in server.log():  # the sampler is stepping
        assert time.time() < deadline and server.proc.poll() is None, server.log()[-3000:]
        time.sleep(0.1)
    server.interrupt()
    assert_stopped_cleanly(server)
    assert set((server.run_dir / "output").glob("*.png")) == saved, "the cancelled prompt saved an image"
