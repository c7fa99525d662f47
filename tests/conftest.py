import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
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
