"""Z-Image Fun ControlNets (alibaba-pai "Z-Image-Turbo-Fun-Controlnet-Union" 1 / 2.0 / 2.1), independent of any host.

A model patch: `ZImageFunControlNet` holds only the control layers; the host's Z-Image base supplies its timestep
embedding, rotary table, tokens (and, for diffusers' variant, refined caption features) from its block hooks, through
`ZImageFunControlNet.start(...)` -> `ZImageControlSteps`. See `model` for which base block receives which output, and
`controlnet_core.formats.zimage_keys` for the file layout, detection and the 2.0 file's all-zero refiner workaround.
"""
from __future__ import annotations

from .blocks import rope_cos_sin
from .config import BASE_BLOCKS, BASE_REFINER_BLOCKS, LATENT_CHANNELS, REFINER_FROM_CONTROL_LAYERS, REFINER_OWN, ZImageFunConfig
from .model import ZImageControlSteps, ZImageFunControlNet, patchify

__all__ = ["BASE_BLOCKS", "BASE_REFINER_BLOCKS", "LATENT_CHANNELS", "REFINER_FROM_CONTROL_LAYERS", "REFINER_OWN",
           "ZImageControlSteps", "ZImageFunConfig", "ZImageFunControlNet", "patchify", "rope_cos_sin"]
