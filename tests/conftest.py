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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
