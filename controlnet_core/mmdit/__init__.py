"""MMDiT-family control models (SD3 / SD3.5), independent of any UI host.

`SD3ControlNet` is the diffusers-layout SD3 ControlNet; `controlnet_core.formats.sd3_keys` detects its files and
derives its `SD3ControlNetConfig` from tensor shapes.
"""
from .config import SD3ControlNetConfig
from .sd3_control import (
    HINT_LATENT_SCALE,
    SD3ControlNet,
    SD3ControlOutput,
    append_keep_mask,
    base_block_sources,
    hint_latent_from_vae,
    host_output_list,
)

__all__ = ["HINT_LATENT_SCALE", "hint_latent_from_vae", "SD3ControlNetConfig", "SD3ControlNet", "SD3ControlOutput", "append_keep_mask", "base_block_sources", "host_output_list"]
