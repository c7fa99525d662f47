"""ComfyUI node classes. Thin: every node calls `controlnet_core` through an adapter that alone knows the host: `comfy_adapter` (sampling), `comfy_patch` (model patches), `train_adapter` (training)."""
from .annotator_nodes import node_mappings
from .apply import ControlNetSuiteApply, ControlNetSuiteApplyStack, ControlNetSuiteStack
from .keyframe_nodes import NODE_CLASS_MAPPINGS as _keyframe_classes
from .keyframe_nodes import NODE_DISPLAY_NAME_MAPPINGS as _keyframe_names
from .loader import ControlNetSuiteLoader
from .model_patch import ControlNetSuiteApplyPatch
from .score_node import ControlNetSuiteScore
from .train_node import ControlNetSuiteTrain
from .union import ControlNetSuiteUnion

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "ControlNetSuiteLoader": ControlNetSuiteLoader,
    "ControlNetSuiteApply": ControlNetSuiteApply,
    "ControlNetSuiteStack": ControlNetSuiteStack,
    "ControlNetSuiteApplyStack": ControlNetSuiteApplyStack,
    "ControlNetSuiteTrain": ControlNetSuiteTrain,
    "ControlNetSuiteUnion": ControlNetSuiteUnion,
    "ControlNetSuiteApplyPatch": ControlNetSuiteApplyPatch,
    "ControlNetSuiteScore": ControlNetSuiteScore,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "ControlNetSuiteLoader": "Load ControlNet (Suite)",
    "ControlNetSuiteApply": "Apply ControlNet (Suite)",
    "ControlNetSuiteStack": "ControlNet Stack (Suite)",
    "ControlNetSuiteApplyStack": "Apply ControlNet Stack (Suite)",
    "ControlNetSuiteTrain": "Train ControlNet (Suite)",
    "ControlNetSuiteUnion": "ControlNet Union (Suite)",
    "ControlNetSuiteApplyPatch": "Apply ControlNet Patch (Suite)",
    "ControlNetSuiteScore": "ControlNet Score (Suite)",
}

NODE_CLASS_MAPPINGS.update(_keyframe_classes)
NODE_DISPLAY_NAME_MAPPINGS.update(_keyframe_names)

_annotator_classes, _annotator_names = node_mappings()
NODE_CLASS_MAPPINGS.update(_annotator_classes)
NODE_DISPLAY_NAME_MAPPINGS.update(_annotator_names)
