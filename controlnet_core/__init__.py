"""controlnet_core: ControlNet for ldm-family UNets (SD1.x, SD2.x, SDXL) and SD3-family MMDiTs, independent of any UI host.

Paper: "Adding Conditional Control to Text-to-Image Diffusion Models", Zhang, Rao, Agrawala 2023.
This package never imports ComfyUI; the ComfyUI nodes of this repository are a thin layer over it.
"""
from .compat import BaseModelInfo, TransformerModelInfo, check_compatible
from .config import ControlNetConfig, config_from_unet_like_state_dict
from .create import create_from_unet
from .errors import (
    BaseModelRequiredError,
    CheckpointError,
    ControlNetError,
    IncompatibleModelError,
    LimitExceededError,
    NonFiniteResidualsError,
    NonFiniteWeightsError,
    NotACheckpointError,
    OutputPathError,
    UnknownLayoutError,
    UnsafeCheckpointError,
)
from .export import save_diffusers, save_ldm, save_native
from .formats import FORMATS, detect_format
from .hint import ResizeMode, check_hint_size, mask_residuals, prepare_hint
from .loader import LoadedControl, load_control
from .model import ControlNet
from .modes import ControlMode, mode_block_scales
from .residuals import RESIDUALS_API_VERSION, ControlResiduals, add, all_finite, cfg_resolution_weights, combine, scale, soft_weights
from .t2i_adapter import T2IAdapter, T2IAdapterConfig

__version__ = "0.1.0"

__all__ = [
    "BaseModelInfo", "TransformerModelInfo", "check_compatible", "ControlNetConfig", "config_from_unet_like_state_dict", "create_from_unet",
    "BaseModelRequiredError", "CheckpointError", "ControlNetError", "IncompatibleModelError", "LimitExceededError", "NonFiniteResidualsError", "NonFiniteWeightsError", "NotACheckpointError", "OutputPathError",
    "UnknownLayoutError", "UnsafeCheckpointError", "save_diffusers", "save_ldm", "save_native", "FORMATS", "detect_format",
    "LoadedControl", "load_control", "ControlNet", "RESIDUALS_API_VERSION", "ControlResiduals", "add", "all_finite",
    "cfg_resolution_weights", "combine", "scale", "soft_weights", "T2IAdapter", "T2IAdapterConfig",
    "ResizeMode", "check_hint_size", "mask_residuals", "prepare_hint", "ControlMode", "mode_block_scales",
]
