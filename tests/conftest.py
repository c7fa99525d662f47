import os
import sys
from pathlib import Path

import pytest
import torch

# Not the repository root: its `nodes/` package would shadow ComfyUI's `nodes` module.
# controlnet_core is importable through the editable install.
sys.path.insert(0, str(Path(__file__).parent))

from comfy_host import host_name, import_comfy, is_oldest_host  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "compat: part of the compatibility subset that runs on the oldest supported host (CNS_HOST=a28a9dc)")


def pytest_report_header(config):
    return f"ComfyUI host: {host_name()} ({os.environ.get('COMFYUI_PATH') or 'embedded'})"


def pytest_collection_modifyitems(config, items):
    """On the oldest supported host only the `compat` subset runs (CNS_FULL_SUITE=1 runs everything there too)."""
    if not is_oldest_host() or os.environ.get("CNS_FULL_SUITE") == "1":
        return
    keep = [i for i in items if i.get_closest_marker("compat")]
    config.hook.pytest_deselected(items=[i for i in items if not i.get_closest_marker("compat")])
    items[:] = keep


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI host (COMFYUI_PATH or the embedded one), imported once with CPU settings."""
    return import_comfy()


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """ComfyUI with this repository as a custom node, a tiny SD1.5-shaped checkpoint and tiny ldm ControlNets."""
    from factories import SDXL_TINY, random_controlnet, save
    from host import TINY_UNET, Host

    h = Host(tmp_path_factory.mktemp("comfy"))
    cn = h.dirs["controlnet"]
    save(cn / "cn_a.safetensors", {"control_model." + k: v * 0.5 for k, v in random_controlnet(TINY_UNET, seed=1).state_dict().items()})
    save(cn / "cn_b.safetensors", random_controlnet(TINY_UNET, seed=2).state_dict())
    save(cn / "cn_sdxl.safetensors", random_controlnet(SDXL_TINY, seed=3).state_dict())
    return h


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
