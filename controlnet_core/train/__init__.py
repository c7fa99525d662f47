"""ControlNet training (paper section 3.3): `Trainer`, `TrainConfig`, `ControlDataset`, the toy world (`toy`).

Next to them, one module per feature: `checkpointing` (gradient checkpointing), `ema`, `cache` (text
embeddings and latents on disk), `buckets` (aspect-ratio bucketing), `conditions` (conditions from the
annotators), `report` (loss curve and validation grid PNGs), `sampling` (DDIM for the grid), `fsdp`, and
`sd_cli` (the `sd` command: training on a real SD1.x/SD2.x/SDXL base from `controlnet_core.base_models`).
Not yet here (see the project's issue on training): the toy base model and the demo.
"""
from .buckets import Buckets
from .data import ControlDataset, DatasetError, drop_prompts, scan
from .trainer import TrainConfig, Trainer, sd_alphas_cumprod

__all__ = ["Buckets", "ControlDataset", "DatasetError", "drop_prompts", "scan", "TrainConfig", "Trainer", "sd_alphas_cumprod"]
