"""ControlNet training (paper section 3.3): `Trainer`, `TrainConfig`, `ControlDataset`, the toy world (`toy`).

Not yet here (see the project's issue on training): a CLI for real checkpoints, FSDP,
gradient checkpointing, EMA, caching, bucketing, the ComfyUI node, the toy base model and the demo.
"""
from .data import ControlDataset, DatasetError, drop_prompts, scan
from .trainer import TrainConfig, Trainer, sd_alphas_cumprod

__all__ = ["ControlDataset", "DatasetError", "drop_prompts", "scan", "TrainConfig", "Trainer", "sd_alphas_cumprod"]
