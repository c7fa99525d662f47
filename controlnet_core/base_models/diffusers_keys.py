"""diffusers folder keys -> the ldm names our models use, for the whole UNet and the VAE.

Why: `UNetModel` and `AutoencoderKL` here follow the ldm checkpoints; a diffusers folder stores the same
weights under other module names. The encoder half of the UNet is the ControlNet table of
`formats/diffusers.py` (reused as is); this adds the decoder half (`up_blocks` -> `output_blocks`,
`conv_norm_out`/`conv_out` -> `out`) and the VAE table. Tables are built from the layout found in the
keys, so scaled-down folders map like full-size ones.
"""
from __future__ import annotations

import re
from typing import Iterable

from ..errors import CheckpointError
from ..formats import diffusers as cn_table

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# diffusers' VAE attention: current names, then the names of folders saved before diffusers 0.14
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _counts(keys: set[str], pattern: str) -> dict[int, int]:
    """{block index: number of sub-modules} for keys matching `pattern` (two groups: block, sub-module)."""
    out: dict[int, int] = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            b, j = int(m.group(1)), int(m.group(2))
            out[b] = max(out.get(b, 0), j + 1)
    return out


def _rename_all(keys: Iterable[str], pairs: list[tuple[str, str]], what: str) -> dict[str, str]:
    """{ldm key: diffusers key}; keys no pair covers are kept under '<unmapped>.' so the strict load names them."""
    pairs = sorted(pairs, key=lambda p: -len(p[0]))  # longest prefix first: 'conv_out' must not catch 'conv_out_x'
    out = {}
    for k in keys:
        for src, dst in pairs:
            if k == src or k.startswith(src + "."):
                out[dst + k[len(src):]] = k
                break
        else:
            out["<unmapped>." + k] = k
    if not any(not c.startswith("<unmapped>") for c in out):
        raise CheckpointError(f"{what}: none of its keys is a diffusers {what} key.")
    return out


def unet_key_map(keys: Iterable[str]) -> dict[str, str]:
    """ldm UNet key -> diffusers `UNet2DConditionModel` key."""
    keys = set(keys)
    down = _counts(keys, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
    if not down:
        raise CheckpointError("diffusers UNet without 'down_blocks.*.resnets.*' keys.")
    n_levels = max(down) + 1
    layers = [down.get(b, 0) for b in range(n_levels)]
    down_attn = [any(k.startswith(f"down_blocks.{b}.attentions.") for k in keys) for b in range(n_levels)]
    pairs = cn_table.module_pairs(layers, down_attn, any(k.startswith("mid_block.attentions.") for k in keys))
    # decoder: up block u is level n_levels-1-u, with one ResBlock more than its encoder level
    up = _counts(keys, r"up_blocks\.(\d+)\.resnets\.(\d+)\.")
    n = 0
    for u in range(n_levels):
        has_attn = any(k.startswith(f"up_blocks.{u}.attentions.") for k in keys)
        for j in range(up.get(u, 0)):
            pairs += [(f"up_blocks.{u}.resnets.{j}.{d}", f"output_blocks.{n}.0.{l}") for d, l in cn_table._RESNET.items()]
            if has_attn:
                pairs.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{n}.1"))
            n += 1
        if u != n_levels - 1:
            pairs.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{n - 1}.{2 if has_attn else 1}.conv"))
    pairs += [("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    return _rename_all(keys, pairs, "UNet")


def vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """ldm `first_stage_model` key (unprefixed) -> diffusers `AutoencoderKL` key."""
    keys = set(keys)
    enc = _counts(keys, r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.")
    dec = _counts(keys, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.")
    if not enc or not dec:
        raise CheckpointError("diffusers VAE without 'encoder.down_blocks.*'/'decoder.up_blocks.*' keys.")
    n_levels = max(enc) + 1
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_norm_out", f"{part}.norm_out"), (f"{part}.conv_out", f"{part}.conv_out")]
        for r, name in enumerate(("block_1", "block_2")):
            pairs += [(f"{part}.mid_block.resnets.{r}.{d}", f"{part}.mid.{name}.{l}") for d, l in _VAE_RESNET.items()]
        pairs += [(f"{part}.mid_block.attentions.0.{d}", f"{part}.mid.attn_1.{l}") for d, l in _VAE_ATTN.items()]
    for b in range(n_levels):
        for j in range(enc.get(b, 0)):
            pairs += [(f"encoder.down_blocks.{b}.resnets.{j}.{d}", f"encoder.down.{b}.block.{j}.{l}") for d, l in _VAE_RESNET.items()]
            pairs += [(f"encoder.down_blocks.{b}.attentions.{j}.{d}", f"encoder.down.{b}.attn.{j}.{l}") for d, l in _VAE_ATTN.items()]
        pairs.append((f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv"))
        level = n_levels - 1 - b  # decoder up block b is ldm level n_levels-1-b
        for j in range(dec.get(b, 0)):
            pairs += [(f"decoder.up_blocks.{b}.resnets.{j}.{d}", f"decoder.up.{level}.block.{j}.{l}") for d, l in _VAE_RESNET.items()]
            pairs += [(f"decoder.up_blocks.{b}.attentions.{j}.{d}", f"decoder.up.{level}.attn.{j}.{l}") for d, l in _VAE_ATTN.items()]
        pairs.append((f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    return _rename_all(keys, pairs, "VAE")


__all__ = ["unet_key_map", "vae_key_map"]
