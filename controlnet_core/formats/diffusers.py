"""diffusers `ControlNetModel` layout <-> canonical ldm keys, from an explicit key table.

Tables are built from the architecture (levels and ResBlocks per level), so scaled-down models map
like full-size ones. Weights are identical between the layouts; only names differ.
"""
from __future__ import annotations

import json
import re
from typing import Iterable, Mapping, Optional

from ..config import ControlNetConfig, count_numbered
from ..errors import CheckpointError
from .record import Format, lazy, lazy_save

SIGNATURE = ("controlnet_cond_embedding.conv_in.weight", "controlnet_down_blocks.0.weight", "controlnet_mid_block.weight")

UNION_MODULES = ("task_embedding", "transformer_layes", "spatial_ch_projs", "control_add_embedding")

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _static_pairs(n_down: int, hint_block_count: int = 6) -> list[tuple[str, str]]:
    pairs = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("controlnet_cond_embedding.conv_in", "input_hint_block.0"),
        ("controlnet_cond_embedding.conv_out", "input_hint_block.14"),
        ("controlnet_mid_block", "middle_block_out.0"),
    ]
    pairs += [(m, m) for m in UNION_MODULES]  # union extras keep their names in both layouts
    pairs += [(f"controlnet_cond_embedding.blocks.{k}", f"input_hint_block.{2 * (k + 1)}") for k in range(hint_block_count)]
    pairs += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(n_down)]
    return pairs


def module_pairs(layers_per_block: Iterable[int], has_attn: Iterable[bool], mid_attn: bool) -> list[tuple[str, str]]:
    """(diffusers module prefix, ldm module prefix) for every module; ResBlocks use `_RESNET` below them."""
    layers_per_block, has_attn = list(layers_per_block), list(has_attn)
    pairs: list[tuple[str, str]] = []
    n = 1
    for b, (L, attn) in enumerate(zip(layers_per_block, has_attn)):
        for j in range(L):
            pairs += [(f"down_blocks.{b}.resnets.{j}.{d}", f"input_blocks.{n}.0.{l}") for d, l in _RESNET.items()]
            if attn:
                pairs.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{n}.1"))
            n += 1
        if b != len(layers_per_block) - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
            n += 1
    mids = ["middle_block.0", "middle_block.2"] if mid_attn else ["middle_block.0"]
    for r, m in enumerate(mids):
        pairs += [(f"mid_block.resnets.{r}.{d}", f"{m}.{l}") for d, l in _RESNET.items()]
    if mid_attn:
        pairs.append(("mid_block.attentions.0", "middle_block.1"))
    return pairs + _static_pairs(n)


def _rename(key: str, pairs: list[tuple[str, str]]) -> Optional[str]:
    for src, dst in pairs:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def _layout_from_keys(keys: set[str]) -> tuple[list[int], list[bool], bool]:
    resnets: dict[int, set[int]] = {}
    attn: dict[int, bool] = {}
    for k in keys:
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", k)
        if m:
            b, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
            resnets.setdefault(b, set())
            if kind == "resnets":
                resnets[b].add(j)
            attn[b] = attn.get(b, False) or kind == "attentions"
    if not resnets:
        raise CheckpointError("diffusers ControlNet without 'down_blocks.*' keys.")
    n = count_numbered(resnets, "down_blocks", "diffusers ControlNet")
    layers = [count_numbered(resnets[b], f"down_blocks.{b}.resnets", "diffusers ControlNet") for b in range(n)]
    return layers, [attn[b] for b in range(n)], any(k.startswith("mid_block.attentions.") for k in keys)


def canonical_map(keys: Iterable[str]) -> dict[str, str]:
    """canonical ldm key -> diffusers key; keys that map nowhere are reported by the strict load."""
    keys = set(keys)
    pairs = module_pairs(*_layout_from_keys(keys))
    out = {}
    for k in keys:
        c = _rename(k, pairs)
        out[c if c is not None else "<unmapped>." + k] = k
    return out


def from_canonical_map(config: ControlNetConfig, canonical_keys: Iterable[str]) -> dict[str, str]:
    """canonical ldm key -> diffusers key, for export."""
    if len(set(config.num_res_blocks)) != 1:
        raise CheckpointError(f"diffusers ControlNetModel needs the same number of ResBlocks per level; this one has {config.num_res_blocks}.")
    pairs = module_pairs(config.num_res_blocks, [d > 0 for d in config.transformer_depth], config.transformer_depth_middle >= 0)
    inverse = [(l, d) for d, l in pairs]
    out = {}
    for k in canonical_keys:
        d = _rename(k, inverse)
        if d is None:
            raise CheckpointError(f"no diffusers name for '{k}'.")
        out[k] = d
    return out


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def heads_from_config(cfg_json: Mapping, level_channels: tuple[int, ...]) -> tuple[Optional[int], Optional[int]]:
    """(num_heads, num_head_channels) from a diffusers config; diffusers' `attention_head_dim` is really the head count."""
    name = "num_attention_heads" if cfg_json.get("num_attention_heads") is not None else "attention_head_dim"
    heads = cfg_json.get(name)
    if heads is None:
        return None, None
    if _is_count(heads):
        return heads, -1
    heads = list(heads) if isinstance(heads, tuple) else heads  # an in-memory config may hold tuples
    if not isinstance(heads, list) or not heads or not all(_is_count(h) for h in heads):
        raise CheckpointError(f"diffusers config: {name} is {heads!r}; expected a positive head count, or one per level.")
    if len(heads) != len(level_channels):
        raise CheckpointError(f"diffusers config: {name} {heads} gives {len(heads)} head counts for the weights' {len(level_channels)} levels {list(level_channels)}.")
    if len(set(heads)) == 1:
        return heads[0], -1
    per_head = {c // h for c, h in zip(level_channels, heads)}
    if len(per_head) == 1:
        return -1, per_head.pop()
    raise CheckpointError(f"diffusers config: head counts {heads} for widths {level_channels} are neither constant nor constant per head; unsupported.")


def config_json(config: ControlNetConfig, addition_time_embed_dim: int = 256) -> dict:
    """A diffusers `config.json` for this architecture.

    SDXL's `y` = pooled text + 6 sinusoidal size embeddings of `addition_time_embed_dim` each; the
    split is not visible in the weights (SDXL: 1280 + 6 * 256 = 2816), so it is an argument.
    """
    if config.num_head_channels > 0:
        heads: object = [c // config.num_head_channels for c in config.level_channels]
    else:
        heads = config.num_heads
    d = {
        "_class_name": "ControlNetModel",
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": list(config.level_channels),
        "conditioning_channels": config.hint_channels,
        "conditioning_embedding_out_channels": list(config.hint_block_channels),
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": config.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in config.transformer_depth],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "global_pool_conditions": config.global_average_pooling,
        "in_channels": config.in_channels,
        "layers_per_block": config.num_res_blocks[0],
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if config.transformer_depth_middle >= 0 else "UNetMidBlock2D",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "only_cross_attention": False,
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": [max(d, 1) for d in config.transformer_depth],
        "upcast_attention": False,
        "use_linear_projection": config.use_linear_in_transformer,
    }
    if config.adm_in_channels:
        if config.adm_in_channels <= 6 * addition_time_embed_dim:
            raise CheckpointError(
                f"label_emb input {config.adm_in_channels} cannot hold 6 size embeddings of {addition_time_embed_dim}; pass the model's addition_time_embed_dim."
            )
        d.update({"addition_embed_type": "text_time", "addition_time_embed_dim": addition_time_embed_dim,
                  "projection_class_embeddings_input_dim": config.adm_in_channels})
    if config.union_types:  # xinsir's union: diffusers' ControlNetUnionModel
        d.update({"_class_name": "ControlNetUnionModel", "num_control_type": config.union_types, "num_trans_channel": config.model_channels,
                  "num_trans_layer": config.union_layers, "num_proj_channel": config.model_channels})
    return d


def config_mismatches(cfg_json: Mapping, config: ControlNetConfig) -> list[str]:
    """Where a diffusers config.json disagrees with the architecture the weights give, as "field X (tensors: Y)".

    Only fields present in the file are compared; diffusers' defaults are not assumed."""
    have: dict[str, object] = {
        "in_channels": config.in_channels,
        "conditioning_channels": config.hint_channels,
        "block_out_channels": list(config.level_channels),
        "layers_per_block": list(config.num_res_blocks),
        "down_block_types": [d > 0 for d in config.transformer_depth],
        "conditioning_embedding_out_channels": list(config.hint_block_channels),
    }
    if any(d > 0 for d in config.transformer_depth) or config.transformer_depth_middle > 0:
        have["cross_attention_dim"] = config.context_dim
    out = []
    for name, value in have.items():
        if name not in cfg_json:
            continue
        said = list(cfg_json[name]) if isinstance(cfg_json[name], tuple) else cfg_json[name]  # an in-memory config may hold tuples
        if name == "layers_per_block" and _is_count(said):
            said = [said] * len(config.num_res_blocks)
        if name == "down_block_types" and isinstance(said, list):  # compared as: levels, and which have attention
            said = ["CrossAttn" in str(t) for t in said]
            if said != value:
                out.append(f"down_block_types {list(cfg_json[name])} (tensors: {len(value)} levels, attention in {[i for i, a in enumerate(value) if a]})")
            continue
        if said != value:
            out.append(f"{name} {said!r} (tensors: {value!r})")
    return out


def read_config_json(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable diffusers config.json ({type(e).__name__}: {e}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a diffusers config.json holds a JSON object of settings; this one holds a {type(data).__name__}.")
    return data


FORMAT = Format("diffusers", "diffusers ControlNetModel", SIGNATURE, lambda keys: "controlnet_cond_embedding.conv_in.weight" in keys,
                lazy("..unet_load", "load_unet", "diffusers"), lazy_save("..export", "save_diffusers"))
