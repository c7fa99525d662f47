"""ComfyUI node classes. Thin: every node calls one `controlnet_core` function.

The node set (loaders, apply-control, stacks, annotators) is registered here as it lands.
"""
from .. import controlnet_core  # noqa: F401  (relative: the folder may have any name inside custom_nodes)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
