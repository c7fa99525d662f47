"""Megapixel limits that bound the work a widget value can ask for, each overridable by an environment variable.

Why one reader: hints, training images and batches all refuse work above a limit before allocating it (the kernel's
OOM killer would otherwise take the whole ComfyUI process), and a user raises a limit the same way everywhere. It is
read at each call, so a changed variable applies from the next prompt on.
"""
from __future__ import annotations

import os

from .errors import LimitExceededError


def megapixel_limit(var: str, default: float) -> float:
    """The limit in megapixels: the environment variable `var` if set, else `default`; a bad value is an error."""
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise LimitExceededError(f"the environment variable {var}={raw!r} is not a positive number of megapixels; unset it or set e.g. {default:.4g}.")
    return value
