import sys
from pathlib import Path

import pytest
import torch

# Not the repository root: its `nodes/` package would shadow ComfyUI's `nodes` module.
# controlnet_core is importable through the editable install.
sys.path.insert(0, str(Path(__file__).parent))

from comfy_host import import_comfy  # noqa: E402


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
