"""ComfyUI entry point of ControlNet Suite.

ComfyUI imports this folder (under whatever name it has in custom_nodes/) as a package; the nodes
live in `nodes/`, the maths in `controlnet_core/`, which never imports ComfyUI.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
