"""ComfyUI entry point of ControlNet Suite.

ComfyUI imports this folder (under whatever name it has in custom_nodes/) as a package; the nodes
live in `nodes/`, the maths in `controlnet_core/`, which never imports ComfyUI.
"""
if not __package__:
    # Imported as a plain module, not as a package: pytest does this with the repository root when the checkout's
    # folder name is not a Python identifier (say, ControlNet-Suite); relative imports cannot work, nothing to offer.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    except ModuleNotFoundError as e:  # imported outside ComfyUI (pip tooling, pytest): no nodes to offer
        if (e.name or "").split(".")[0] not in ("comfy", "folder_paths"):
            raise
        NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
