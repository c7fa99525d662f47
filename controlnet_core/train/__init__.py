"""ControlNet training (paper section 3.3): `Trainer`, `TrainConfig`, `ControlDataset`, the toy world (`toy`).

Next to them, one module per feature: `checkpointing` (gradient checkpointing), `ema`, `cache` (text
embeddings and latents on disk), `buckets` (aspect-ratio bucketing), `data` (the dataset; its `ConditionFn`
derives conditions while loading, and the annotators package builds one: `annotators.training`), `dataset_check` (every file, pair and size checked before step 1; megapixel limits per image and
batch), `report` (loss curve and validation grid PNGs), `sampling` (DDIM for the grid), `fsdp`, and
`sd_cli` (the `sd` command: training on a real SD1.x/SD2.x/SDXL base from `controlnet_core.base_models`).
The toy world in which the paper's experiments are reproduced (experiments/, `make demo`): `toy_world` (128 px
circles, word-level prompt encoder, pooling "VAE", the base UNet's size), `toy_metrics` (controllability: IoU of
the generated shape with the outlined one), `toy_sample` (load the shipped models, sample, score). The toy base
model is trained by `Trainer(unet, None, ...)`, the base mode.
"""
from .buckets import Buckets
from .data import ControlDataset, DatasetError, drop_prompts, scan
from .trainer import TrainConfig, Trainer, sd_alphas_cumprod

__all__ = ["Buckets", "ControlDataset", "DatasetError", "drop_prompts", "scan", "TrainConfig", "Trainer", "sd_alphas_cumprod"]
