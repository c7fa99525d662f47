"""ComfyUI node classes. Thin: every node calls `controlnet_core` through `comfy_adapter`."""
from .apply import ControlNetSuiteApply, ControlNetSuiteApplyStack, ControlNetSuiteStack
from .loader import ControlNetSuiteLoader

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "ControlNetSuiteLoader": ControlNetSuiteLoader,
    "ControlNetSuiteApply": ControlNetSuiteApply,
    "ControlNetSuiteStack": ControlNetSuiteStack,
    "ControlNetSuiteApplyStack": ControlNetSuiteApplyStack,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "ControlNetSuiteLoader": "Load ControlNet (Suite)",
    "ControlNetSuiteApply": "Apply ControlNet (Suite)",
    "ControlNetSuiteStack": "ControlNet Stack (Suite)",
    "ControlNetSuiteApplyStack": "Apply ControlNet Stack (Suite)",
}
