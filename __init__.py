"""ComfyUI entry point of ControlNet Suite.

ComfyUI imports this folder (under whatever name it has in custom_nodes/) as a package; the nodes
live in `nodes/`, the maths in `controlnet_core/`, which never imports ComfyUI.
"""
try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as e:  # imported outside ComfyUI (pip tooling, pytest): no nodes to offer
    if (e.name or "").split(".")[0] not in ("comfy", "folder_paths"):
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
