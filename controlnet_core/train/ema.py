"""Exponential moving average (EMA) of the trained weights.

Why: averaging the weights over the last ~1/(1-decay) optimizer steps smooths out the step-to-step
noise of AdamW at a constant learning rate; the averaged model usually samples better than the last
iterate, which is why Stable Diffusion and many ControlNet trainers export EMA weights.

After every optimizer step: ema = decay * ema + (1 - decay) * weight, starting from the initial weights.
So after k steps with weights w_1..w_k: ema_k = decay^k * w_0 + sum_i (1 - decay) * decay^(k-i) * w_i.
The shadow copies are kept in float32 (whatever the training dtype) and in the checkpoint, so a resumed
run continues the same average bit for bit.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import ControlNetError


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a possibly sharded one (FSDP2 parameters are DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Shadow weights for named parameters (for example a ControlNet's `named_parameters()`)."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ControlNetError(f"ema_decay must be between 0 and 1 (exclusive), e.g. 0.999; got {decay}.")
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step; call after each optimizer step."""
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)  # s + (1-d)(p - s) = d*s + (1-d)*p
        self.updates += 1

    def state_dict(self) -> dict:
        """Full (unsharded) float32 tensors; collective under FSDP, so every rank must call it."""
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: _full(v).detach().cpu() for k, v in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ControlNetError(f"EMA state lacks {len(missing)} weights, e.g. {missing[:3]}; it was saved for another model.")
        for k, s in self.shadow.items():
            src = state["shadow"][k]
            if hasattr(s, "redistribute"):  # DTensor shard: take this rank's part of the full tensor
                from torch.distributed.tensor import distribute_tensor

                s.copy_(distribute_tensor(src.to(s.dtype), s.device_mesh, s.placements))
            else:
                s.copy_(src)
        self.decay, self.updates = float(state["decay"]), int(state["updates"])

    def weights(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Full EMA tensors, in each parameter's own dtype, for the names under `prefix` (prefix removed)."""
        return {k[len(prefix):]: _full(v).to(self.params[k].dtype) for k, v in self.shadow.items() if k.startswith(prefix)}

    @torch.no_grad()
    def copy_to(self, module: nn.Module, prefix: str = "") -> nn.Module:
        """Put the EMA weights into `module` (a copy of the trained network: the training one keeps its own)."""
        w = self.weights(prefix)
        own = dict(module.named_parameters())
        missing = sorted(set(own) - set(w))
        if missing:
            raise ControlNetError(f"no EMA weights for {len(missing)} parameters of {type(module).__name__}, e.g. {missing[:3]}.")
        for k, p in own.items():
            p.copy_(w[k])
        return module


__all__ = ["EMA"]
