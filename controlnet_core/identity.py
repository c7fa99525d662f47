"""Identities of models and encoders: a string that changes whenever what they compute would change.

Why a module of its own: the training caches key their entries with these (`train/cache.py`), and the base-model
encoders (`base_models/conditioning.py`) name themselves with them; both packages import it, and it imports neither.
"""
from __future__ import annotations

import hashlib
import logging

import torch

log = logging.getLogger(__name__)


def module_identity(module: torch.nn.Module) -> str:
    """Class name and a hash of every parameter and buffer (name, dtype, shape, bytes) of `module`."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in list(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{type(module).__qualname__}-{h.hexdigest()[:24]}"


def encoder_identity(encoder: object) -> str:
    """A string that changes when the encoder would encode differently.

    Anything with a `cache_identity` attribute: that. Modules: `module_identity`. Plain functions:
    their qualified name and bytecode. Anything else: its type name (give such encoders a
    `cache_identity`, or pass `identity=` to the cache).
    """
    explicit = getattr(encoder, "cache_identity", None)
    if explicit:
        return str(explicit)
    if isinstance(encoder, torch.nn.Module):
        return module_identity(encoder)
    code = getattr(encoder, "__code__", None)
    if code is not None:
        h = hashlib.sha256(code.co_code + repr(code.co_consts).encode())
        return f"{getattr(encoder, '__module__', '')}.{encoder.__qualname__}-{h.hexdigest()[:16]}"
    log.warning("cache: no identity for encoder %r; using its type name. Give it a cache_identity attribute.", encoder)
    return type(encoder).__qualname__
