"""Gradient checkpointing for training: keep block inputs, recompute block internals during backward.

Why: a ControlNet step holds the activations of the trainable copy *and* of the locked UNet's decoder
(the residuals' gradients flow back through it even though its weights are frozen). Recomputing each
block in the backward pass trades about one extra forward for most of that memory, which is what lets
SD1.5/SDXL ControlNets train at useful batch sizes.

How: the `forward` of each chosen block is replaced, on that instance only, by a call through
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`. Parameter names and state dicts do not change
(no wrapper modules), so checkpoints, exports and loaders see the same keys. Dropout is 0 in these
networks and the RNG state is preserved anyway, so the recomputed forward equals the first one.
"""
from __future__ import annotations

import logging
import weakref
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ControlNetError

log = logging.getLogger(__name__)

_MARK = "_cns_checkpointed_forward"


class _Checkpointed:
    """Replacement `forward`: checkpointed when something in the block will need a gradient."""

    def __init__(self, module: nn.Module):
        # the class's forward and a weak reference: a bound method stored on the module would make a reference
        # cycle, and the module (a whole network's block) would wait for the cyclic garbage collector to be freed
        self.function = type(module).forward
        self.module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        module = self.module()
        if not torch.is_grad_enabled() or not self._needs_grad(module, args, kwargs):
            return self.function(module, *args, **kwargs)  # nothing would be saved for backward: plain call
        return checkpoint(self.function, module, *args, use_reentrant=False, **kwargs)

    @staticmethod
    def _needs_grad(module: nn.Module, args, kwargs) -> bool:
        # looked up per call: dtype casts, requires_grad_ and FSDP sharding may replace or change parameters
        if any(p.requires_grad for p in module.parameters()):
            return True
        return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def _wrap(module: nn.Module) -> bool:
    if _MARK in module.__dict__:
        return False
    fn = _Checkpointed(module)
    module.forward = fn  # instance attribute shadows the class method; state_dict keys unchanged
    module.__dict__[_MARK] = fn
    return True


def _unwrap(module: nn.Module) -> None:
    if module.__dict__.pop(_MARK, None) is not None:
        del module.forward


def controlnet_blocks(controlnet: nn.Module) -> Iterator[nn.Module]:
    """The ControlNet's heavy blocks: hint encoder, each encoder block, the middle block."""
    yield controlnet.input_hint_block
    yield from controlnet.input_blocks
    yield controlnet.middle_block


def unet_blocks(unet: nn.Module) -> Iterator[nn.Module]:
    """The UNet's blocks as its forward calls them: encoder and middle blocks whole, decoder layer by layer
    (UNetModel.forward steps through each decoder block's layers itself, to pass the upsampling size)."""
    yield from unet.input_blocks
    yield unet.middle_block
    for block in unet.output_blocks:
        yield from block


def enable(modules: Iterable[nn.Module]) -> int:
    """Checkpoint every module in `modules`; returns how many were newly wrapped."""
    n = sum(_wrap(m) for m in modules)
    log.debug("gradient checkpointing on %d blocks", n)
    return n


def disable(modules: Iterable[nn.Module]) -> None:
    for m in modules:
        _unwrap(m)


SCOPES = ("controlnet", "all")
# bench/bench_train.py (bench/RESULTS.md), SD1.5 shapes: at 512 px "all" saves 1.8x the memory of "controlnet" for
# 5% more step time, at 1024 px 5.3 against 2.7 GiB; who turns checkpointing on does it for memory
DEFAULT_SCOPE = "all"


def scope_of(setting: Union[bool, str]) -> Optional[str]:
    """A TrainConfig.gradient_checkpointing value -> None (off) or one of SCOPES (True: DEFAULT_SCOPE)."""
    if setting is False or setting is None:
        return None
    if setting is True:
        return DEFAULT_SCOPE
    if setting in SCOPES:
        return setting
    raise ControlNetError(f"gradient_checkpointing must be False, True or one of {', '.join(map(repr, SCOPES))}, not {setting!r}.")


def enable_for_training(controlnet: nn.Module, unet: nn.Module, scope: str = "all") -> int:
    """scope "controlnet": the trainable copy's encoder and middle blocks only, as diffusers' `train_controlnet.py`
    checkpoints: the cheaper one in time. scope "all" (DEFAULT_SCOPE): also the hint encoder and every UNet block,
    about twice the saving for a few per cent more step time (bench/RESULTS.md). UNet blocks whose inputs and weights
    need no gradient (the locked encoder and middle block) run plainly at call time, so "all" is right for locked and
    unlocked bases."""
    if scope == "controlnet":
        return enable([*controlnet.input_blocks, controlnet.middle_block])
    if scope != "all":
        raise ControlNetError(f"gradient checkpointing scope must be one of {', '.join(map(repr, SCOPES))}, not {scope!r}.")
    return enable(controlnet_blocks(controlnet)) + enable(unet_blocks(unet))


def is_enabled(module: nn.Module) -> bool:
    return _MARK in module.__dict__


__all__ = ["enable", "disable", "enable_for_training", "controlnet_blocks", "unet_blocks", "is_enabled", "scope_of", "SCOPES",
           "DEFAULT_SCOPE"]
