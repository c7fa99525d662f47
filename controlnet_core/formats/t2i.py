"""T2I-Adapter layouts: original (TencentARC, optionally under `adapter.`) and diffusers (full and light)."""
from __future__ import annotations

import re
from typing import Iterable, Optional

from .record import Format, lazy, lazy_save

SIGNATURE_FULL = ("conv_in.weight", "body.0.block1.weight", "body.0.block2.weight")
SIGNATURE_LIGHT = ("body.0.in_conv.weight", "body.0.body.0.block1.weight", "body.0.out_conv.weight")


def _strip(keys: set[str], prefix: str) -> set[str]:
    return {k[len(prefix):] for k in keys if k.startswith(prefix)}


def detect(keys: set[str]) -> Optional[str]:
    """'t2i-full', 't2i-light', 't2i-full-diffusers', 't2i-light-diffusers' or None."""
    if "adapter.body.0.resnets.0.block1.weight" in keys:
        return "t2i-full-diffusers" if "adapter.conv_in.weight" in keys else "t2i-light-diffusers"
    for prefix in ("", "adapter."):
        k = _strip(keys, prefix) if prefix else keys
        if "conv_in.weight" in k and "body.0.block1.weight" in k:
            return "t2i-full"
        if "body.0.in_conv.weight" in k and "body.0.body.0.block1.weight" in k:
            return "t2i-light"
    return None


def canonical_map(keys: Iterable[str], fmt: str) -> dict[str, str]:
    """canonical (original-layout) key -> source key."""
    keys = list(keys)
    out = {}
    if fmt in ("t2i-full", "t2i-light"):
        prefix = "adapter." if any(k.startswith("adapter.") for k in keys) and not any(k.startswith("body.") for k in keys) else ""
        return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    for k in keys:
        if not k.startswith("adapter."):
            out["<unmapped>." + k] = k
            continue
        c = k[len("adapter."):]
        if fmt == "t2i-full-diffusers":
            m = re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", c)
            if m:
                c = f"body.{int(m.group(1)) * 2 + int(m.group(2))}.{m.group(3)}"
            else:
                m = re.match(r"body\.(\d+)\.(.*)", c)  # a level's in_conv/downsample belongs to its first block
                if m:
                    c = f"body.{int(m.group(1)) * 2}.{m.group(2)}"
        else:
            c = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", c)
        out[c] = k
    return out


def to_diffusers_map(canonical: Iterable[str], light: bool) -> dict[str, str]:
    """canonical key -> diffusers key (inverse of `canonical_map`)."""
    out = {}
    for k in canonical:
        if light:
            d = re.sub(r"^body\.(\d+)\.body\.(\d+)\.", r"body.\1.resnets.\2.", k)
        else:
            m = re.match(r"body\.(\d+)\.(in_conv|down_opt)\.(.*)", k)
            m2 = re.match(r"body\.(\d+)\.(.*)", k)
            if m:
                d = f"body.{int(m.group(1)) // 2}.{m.group(2)}.{m.group(3)}"
            elif m2:
                i = int(m2.group(1))
                d = f"body.{i // 2}.resnets.{i % 2}.{m2.group(2)}"
            else:
                d = k
        out[k] = "adapter." + d
    return out


def _t2i(name: str, description: str, signature: tuple, save) -> Format:
    return Format(name, description, signature, lambda keys: detect(keys) == name, lazy("..unet_load", "load_t2i", name), save,
                  kind="t2i_adapter")


FORMATS = (
    _t2i("t2i-full", "T2I-Adapter (full), original layout", SIGNATURE_FULL, lazy_save("..export", "save_ldm")),
    _t2i("t2i-light", "T2I-Adapter (light), original layout", SIGNATURE_LIGHT, lazy_save("..export", "save_ldm")),
    _t2i("t2i-full-diffusers", "T2I-Adapter (full), diffusers layout", (), lazy_save("..export", "save_diffusers")),
    _t2i("t2i-light-diffusers", "T2I-Adapter (light), diffusers layout", (), lazy_save("..export", "save_diffusers")),
)
