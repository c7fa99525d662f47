"""Training a ControlNet as the paper does: locked base, zero-initialised copy, epsilon loss, 50% empty prompts.

The trainer is model-agnostic about text and image encoders (callables), so the same code trains on a
real SD checkpoint or on the toy world. Checkpoints hold everything a resumed run needs to continue
bit for bit: ControlNet (and unlocked base) weights, optimizer, step, data order and position, RNG states.
"""
from __future__ import annotations

import logging
import math
import random
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..errors import ControlNetError
from ..model import ControlNet
from ..residuals import ControlResiduals
from ..unet import UNetModel
from . import run_files
from .data import DatasetError, drop_prompts

log = logging.getLogger(__name__)


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled linear" schedule: betas linear in sqrt space."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


MEMORY_ONLY = ("gradient_checkpointing",)  # TrainConfig fields that change memory and time, never the result


@dataclass
class TrainConfig:
    lr: float = 1e-5  # the paper's learning rate
    batch_size: int = 4
    empty_prompt_rate: float = 0.5  # the paper replaces 50% of prompts with "" (section 3.3)
    sd_locked: bool = True  # False also trains the base decoder (output blocks + out), as the original `sd_locked=False`
    only_mid_control: bool = False  # inject only the middle-block residual
    prediction: str = "eps"  # "eps" (SD1.x, SD2-base) or "v" (SD2-v)
    seed: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "no"  # "fp16" / "bf16": autocast, and the locked base stored in that dtype
    # recompute block activations in backward, for memory: False, "controlnet" (the trainable copy's blocks, as
    # diffusers does), "all" (also the hint encoder and the locked UNet's blocks); True = checkpointing.DEFAULT_SCOPE ("all")
    gradient_checkpointing: Union[bool, str] = False
    ema_decay: float = 0.0  # > 0 (e.g. 0.999): keep an EMA of the ControlNet weights, saved and exportable; 0: off
    cache_dir: Optional[str] = None  # cache text embeddings and VAE latents on disk here (see cache.py)
    distributed: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (sharded; for SDXL-size models)

    def __post_init__(self):
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)  # checkpoints hold plain types only (weights_only loading)
        from .checkpointing import scope_of

        scope_of(self.gradient_checkpointing)  # a wrong value fails here, before any model is touched


class Trainer:
    """controlnet=None: base mode, the whole UNet trains with the same loss, data and checkpoints (how the toy
    world's base model is made, and the full fine-tuning that ControlNet training is compared with)."""

    def __init__(self, unet: UNetModel, controlnet: Optional[ControlNet], encode_text: Callable[[list[str]], torch.Tensor],
                 encode_image: Callable[[torch.Tensor], torch.Tensor], dataset, config: Optional[TrainConfig] = None):
        config = config if config is not None else TrainConfig()
        if config.prediction not in ("eps", "v"):
            raise ControlNetError(f"prediction must be 'eps' or 'v', not {config.prediction!r}.")
        if config.mixed_precision not in ("no", "fp16", "bf16"):
            raise ControlNetError(f"mixed_precision must be 'no', 'fp16' or 'bf16', not {config.mixed_precision!r}.")
        if config.grad_accum < 1:
            raise ControlNetError(f"grad_accum must be >= 1, not {config.grad_accum}.")
        if len(dataset) < config.batch_size:
            raise ControlNetError(f"the dataset has {len(dataset)} samples, fewer than one batch of {config.batch_size}.")
        check_batches = getattr(dataset, "check_batches", None)  # a ControlDataset: mixed sizes and memory, before step 1
        if check_batches is not None:
            check_batches(config.batch_size)
        self.unet, self.controlnet, self.config = unet, controlnet, config
        self.trained = controlnet if controlnet is not None else unet  # the module whose weights the optimizer owns
        if controlnet is None and config.distributed == "fsdp":
            raise ControlNetError("base mode (controlnet=None) trains with DDP only; use distributed='ddp'.")
        self.encode_text, self.encode_image, self.dataset = encode_text, encode_image, dataset
        samples = getattr(dataset, "samples", None)  # a ControlDataset's pairs: fingerprinted into every checkpoint
        self.dataset_fingerprint = run_files.dataset_fingerprint(samples) if samples is not None else None
        unet.requires_grad_(False).eval()
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        if self.amp_dtype is not None and config.sd_locked and controlnet is not None:
            unet.to(self.amp_dtype)  # the locked base needs no fp32 master weights: half the memory
        device = next(self.trained.parameters()).device
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" and device.type == "cuda" else None
        self.fsdp = self._shard_if_fsdp(controlnet) if controlnet is not None else False  # before the optimizer sees the parameters
        params = list(self.trained.parameters())
        if not config.sd_locked and controlnet is not None:
            decoder = list(unet.output_blocks.parameters()) + list(unet.out.parameters())
            for p in decoder:
                p.requires_grad_(True)
            params += decoder
        self.trained.requires_grad_(True).train()
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.alphas = sd_alphas_cumprod()
        # torchrun / DistributedDataParallel: each process takes its slice of a global batch of
        # batch_size * world_size; noise, timesteps and empty prompts are drawn for the global batch
        # (same RNG on every rank), so N processes compute exactly what one process with N times the batch would.
        dist = torch.distributed
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        self.net = self.trained
        if self.world > 1 and not self.fsdp:
            self.net = torch.nn.parallel.DistributedDataParallel(self.trained)
        self.step = 0
        self.epoch, self.position = 0, 0
        self.gen = torch.Generator().manual_seed(config.seed)
        self.prompt_rng = random.Random(config.seed)
        self._order = self._permutation(0)
        self._init_features()

    # -- data order: a seeded permutation per epoch, so a resumed run sees the same batches --

    def _permutation(self, epoch: int) -> torch.Tensor:
        bucketed = getattr(self.dataset, "epoch_order", None)  # aspect-ratio buckets: one bucket per global batch
        order = bucketed(epoch, self.config.seed, self.config.batch_size * self.world) if bucketed else None
        if order is not None:
            return order
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))

    def next_batch(self) -> dict:
        idx = []
        while len(idx) < self.config.batch_size * self.world:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            idx.append(int(self._order[self.position]))
            self.position += 1
        b = self.config.batch_size
        mine = idx[self.rank * b : (self.rank + 1) * b]
        items = [self.dataset[i] for i in mine]
        return {"hint": self._stack(items, "hint", mine), "target": self._stack(items, "target", mine),
                "prompt": [it["prompt"] for it in items], "keys": [it.get("key") for it in items]}

    def _stack(self, items: list, key: str, idx: list) -> torch.Tensor:
        """torch.stack, or an error naming the samples when their sizes differ (a dataset without `check_batches`)."""
        shapes = [tuple(it[key].shape) for it in items]
        if len(set(shapes)) > 1:
            samples = getattr(self.dataset, "samples", None)
            names = [str(samples[i].target) if samples is not None else f"sample {i}" for i in idx]
            found = ", ".join(f"{n} {'x'.join(map(str, s[::-1][:2]))}" for n, s in zip(names, shapes))
            raise DatasetError(f"a batch must share one size, but its {key} tensors differ: {found}. Resize the data to one "
                               "size, or use a square size or aspect-ratio buckets (see controlnet_core.train.buckets).")
        return torch.stack([it[key] for it in items])

    # -- one optimisation step --

    def loss(self, batch: dict) -> torch.Tensor:
        device = next(self.trained.parameters()).device
        b = batch["target"].shape[0]
        mine = slice(self.rank * b, (self.rank + 1) * b)
        with torch.no_grad():
            latents = self._encode_latents(batch, device)
            keep = drop_prompts(["x"] * (b * self.world), self.config.empty_prompt_rate, self.prompt_rng)[mine]
            context = self._encode_context(batch["prompt"], keep)
        context, y = context if isinstance(context, tuple) else (context, None)  # SDXL's encoders also give the label vector y
        t = torch.randint(0, len(self.alphas), (b * self.world,), generator=self.gen)[mine]
        noise = torch.randn((b * self.world, *latents.shape[1:]), generator=self.gen)[mine].to(device)
        a = self.alphas[t].to(device).view(b, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        if self.controlnet is None:  # base mode: the UNet alone, no condition image
            pred = self.net(x_t, t.to(device).float(), context, y)
        else:
            res = self.net(x_t, batch["hint"].to(device), t.to(device).float(), context, y)
            if self.config.only_mid_control:
                res = ControlResiduals(mid=res.mid)
            pred = self.unet(x_t, t.to(device).float(), context, y, control=res)
        target = noise if self.config.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
        return F.mse_loss(pred.float(), target.float())

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        if self.amp_dtype is None:
            return self.loss(batch)
        device = next(self.trained.parameters()).device
        with torch.autocast(device.type, dtype=self.amp_dtype):
            return self.loss(batch)

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns their mean loss."""
        self.optimizer.zero_grad(set_to_none=True)  # a step that raised half-way leaves nothing behind either
        total = 0.0
        for _ in range(self.config.grad_accum):
            loss = self._forward_loss(self.next_batch()) / self.config.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # freed now, not at the next step's start: the gradients (the size of the trained weights, 1.45 GB for SD1.5)
        # would otherwise stay resident between steps, through checkpoint saves and the host's other work
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        if not math.isfinite(total):
            raise ControlNetError(f"loss became {total} at step {self.step}; lower the learning rate.")
        return total

    def train(self, steps: int, checkpoint: Optional[Path] = None, save_every: int = 0,
              on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
        """Run `steps` more steps; Ctrl-C (SIGINT) finishes the current step, saves, and stops."""
        stop = {"now": False}
        previous = signal.getsignal(signal.SIGINT) if checkpoint else None
        if checkpoint:
            signal.signal(signal.SIGINT, lambda *a: stop.update(now=True))
        losses = []
        try:
            for _ in range(steps):
                losses.append(self.train_step())
                if on_step:
                    on_step(self.step, losses[-1])
                if checkpoint and (stop["now"] or (save_every and self.step % save_every == 0)):
                    self.save_checkpoint(checkpoint)
                if stop["now"]:
                    log.info("interrupted at step %d; checkpoint saved to %s", self.step, checkpoint)
                    break
        finally:
            if checkpoint:
                signal.signal(signal.SIGINT, previous)
        if checkpoint:
            self.save_checkpoint(checkpoint)
        return losses

    # -- checkpoints: written atomically, resumed exactly --

    def state(self) -> dict:
        s = {"controlnet": self.controlnet.state_dict() if self.controlnet is not None else {}, "optimizer": self.optimizer.state_dict(), "step": self.step,
             "epoch": self.epoch, "position": self.position, "gen": self.gen.get_state(),
             "prompt_rng": torch.tensor(self.prompt_rng.getstate()[1], dtype=torch.int64),
             "prompt_rng_gauss": self.prompt_rng.getstate()[2],
             "config": {k: v for k, v in asdict(self.config).items()}}
        if self.dataset_fingerprint is not None:
            s["dataset"] = dict(self.dataset_fingerprint)
        if not self.config.sd_locked or self.controlnet is None:
            s["unet"] = self.unet.state_dict()
        s.update(self._feature_state())
        return s

    def save_checkpoint(self, path: Path) -> None:
        state = self.state() if self.fsdp else None  # gathering shards is collective: every rank takes part
        if self.rank != 0:  # every rank holds the same weights; one writes
            return
        run_files.save_checkpoint(state if state is not None else self.state(), Path(path))

    def load_checkpoint(self, path: Path, fresh_hint: str = "start fresh with --overwrite (or another --out)") -> None:
        """Damaged files and another dataset are refused with the file named and what to do (run_files)."""
        s = run_files.load_checkpoint(Path(path), fresh_hint=fresh_hint)
        if self.dataset_fingerprint is not None:
            run_files.check_same_dataset(Path(path), s.get("dataset"), self.dataset_fingerprint, getattr(self.dataset, "root", None))
        saved = {**asdict(TrainConfig()), **s["config"]}  # settings added since the file was written take their defaults
        ours = asdict(self.config)
        for k in MEMORY_ONLY:  # change memory and time, not the weights: a run may resume with them switched
            saved.pop(k, None), ours.pop(k, None)
        if saved != ours:
            raise ControlNetError(f"{path}: saved with settings {saved}, resumed with {asdict(self.config)}; resume with the same settings.")
        if self.fsdp:
            from .fsdp import load_full_state

            load_full_state(self.controlnet, self.optimizer, s["controlnet"], s["optimizer"])
        elif self.controlnet is not None:
            self.controlnet.load_state_dict(s["controlnet"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
        if "unet" in s:
            self.unet.load_state_dict(s["unet"])
        if not self.fsdp:
            self.optimizer.load_state_dict(s["optimizer"])
        self.step, self.epoch, self.position = s["step"], s["epoch"], s["position"]
        self._order = self._permutation(self.epoch)
        self.gen.set_state(s["gen"])
        self.prompt_rng.setstate((3, tuple(int(v) for v in s["prompt_rng"].tolist()), s["prompt_rng_gauss"]))

    # -- gradient checkpointing, EMA, caches, FSDP, export (the modules next to this one do the work) --

    def _shard_if_fsdp(self, controlnet: ControlNet) -> bool:
        if self.config.distributed not in ("ddp", "fsdp"):
            raise ControlNetError(f"distributed must be 'ddp' or 'fsdp', not {self.config.distributed!r}.")
        dist = torch.distributed
        if self.config.distributed != "fsdp" or not (dist.is_available() and dist.is_initialized()):
            return False  # one process: nothing to shard
        from .fsdp import shard

        shard(controlnet)
        return True

    def _init_features(self) -> None:
        cfg = self.config
        from .checkpointing import scope_of

        scope = scope_of(cfg.gradient_checkpointing)
        if scope is not None:
            from .checkpointing import enable_for_training

            if self.controlnet is None:  # base mode: the whole UNet trains, so its blocks are what to checkpoint
                from .checkpointing import enable, unet_blocks

                enable(unet_blocks(self.unet))
            else:
                enable_for_training(self.controlnet, self.unet, scope)
        self.ema = None
        if cfg.ema_decay:
            from .ema import EMA

            self.ema = EMA(self.trained.named_parameters(), cfg.ema_decay)
        self.text_cache = self.latent_cache = None
        if cfg.cache_dir:
            from .cache import LatentCache, TextCache

            device = next(self.trained.parameters()).device
            self.text_cache = TextCache(self.encode_text, cfg.cache_dir, device=device)
            self.latent_cache = LatentCache(self.encode_image, cfg.cache_dir)

    def _encode_latents(self, batch: dict, device) -> torch.Tensor:
        keys = batch.get("keys")
        if self.latent_cache is not None and keys and all(keys):
            return self.latent_cache(batch["target"].to(device), keys)
        return self.encode_image(batch["target"].to(device))

    def _encode_context(self, prompts: list, keep: list) -> torch.Tensor:
        if self.text_cache is not None:  # encodes the real prompts too, so later epochs find them all
            return self.text_cache.encode_with_drop(prompts, keep)
        return self.encode_text([p if k else "" for p, k in zip(prompts, keep)])

    def _feature_state(self) -> dict:
        s: dict = {}
        if self.fsdp:
            from .fsdp import full_model_state, full_optimizer_state

            s["controlnet"] = full_model_state(self.controlnet)
            s["optimizer"] = full_optimizer_state(self.controlnet, self.optimizer)
        if self.ema is not None:
            s["ema"] = self.ema.state_dict()
        return s

    def export_controlnet(self, ema: Optional[bool] = None) -> ControlNet:
        """A plain (unsharded, not checkpointed) copy of the trained ControlNet; ema=None: the EMA weights when
        EMA is on. Collective under FSDP (every rank must call it; the weights are complete on rank 0)."""
        if self.controlnet is None:
            raise ControlNetError("export_controlnet: this trainer trains the base UNet (controlnet=None); save trainer.unet instead.")
        use_ema = self.ema is not None if ema is None else ema
        if use_ema and self.ema is None:
            raise ControlNetError("export_controlnet(ema=True): this run keeps no EMA; set TrainConfig(ema_decay=...).")
        if self.fsdp:
            from .fsdp import full_model_state

            weights = full_model_state(self.controlnet)
        else:
            weights = {k: v.detach().clone() for k, v in self.controlnet.state_dict().items()}
        if use_ema:
            weights.update(self.ema.weights())
        first = next(iter(self.controlnet.state_dict().values()))
        out = ControlNet(self.controlnet.config, dtype=first.dtype, device="cpu" if self.fsdp else first.device)
        if weights:  # FSDP ranks other than 0 receive no tensors
            out.load_state_dict(weights)
        return out.eval()

    def save_controlnet(self, path: Path, ema: Optional[bool] = None, *, overwrite: bool = False) -> Optional[Path]:
        """The v1.1-layout safetensors of `export_controlnet` (rank 0 writes; returns None elsewhere). An existing
        file at `path` is refused (`OutputPathError`) unless `overwrite=True`, as in `save_ldm`."""
        from ..export import save_ldm

        model = self.export_controlnet(ema)
        return save_ldm(model, path, overwrite=overwrite) if self.rank == 0 else None
