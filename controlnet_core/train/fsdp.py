"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for the trained ControlNet.

Why: with DistributedDataParallel every process holds the whole ControlNet, its gradients and AdamW's two
moments in float32: 16 bytes per parameter, 20 GB for SDXL's 1.25 B-parameter ControlNet before any
activation. FSDP splits parameters, gradients and optimizer state across the processes and gathers each
block's weights only while that block runs, so the per-process cost falls with the number of processes.

Each encoder block and the middle block is its own shard unit (gathered and freed in turn); the root unit
holds the rest (embeddings, hint encoder, zero convolutions). Gradients are averaged over the processes as
DDP does, so N processes compute what one process with N times the batch would. Works with gloo on CPU and
NCCL on GPU (torch >= 2.6). Checkpoints hold full, unsharded tensors (gathered collectively, written by rank 0).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _dist():
    import torch.distributed as dist

    return dist


def shard(controlnet: nn.Module) -> nn.Module:
    """Shard `controlnet` in place over all processes of the default process group; returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(controlnet.parameters()).device
    mesh = init_device_mesh(device.type, (_dist().get_world_size(),))
    for block in [*controlnet.input_blocks, controlnet.middle_block]:
        fully_shard(block, mesh=mesh)
    fully_shard(controlnet, mesh=mesh)
    return controlnet


def is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU of rank 0; other ranks get {} (collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return dict(get_model_state_dict(model, options=_options(cpu_offload=True)))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with whole tensors on rank 0's CPU, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Every rank passes the same full state; each keeps its shard (collective)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())


__all__ = ["shard", "is_sharded", "full_model_state", "full_optimizer_state", "load_full_state"]
