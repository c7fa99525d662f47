"""`ControlNetConfig`, derived from tensor shapes so that scaled-down checkpoints load like full ones.

Head counts are the one setting the weights cannot show. The convention of the ldm family is used:
a transformer with 1x1-conv projections (SD1.x) has 8 heads; one with linear projections (SD2.x,
SDXL) has 64 channels per head. A diffusers `config.json` or our own safetensors metadata overrides it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

from .errors import CheckpointError, ControlNetError

_INPUT_BLOCK = re.compile(r"^input_blocks\.(\d+)\.")
_INDEX = re.compile(r"(\d+)\.")
_MAX_SIZE = 1 << 20  # no real layer is that wide or deep; bounds what damaged metadata can ask to build
_GROUPS = 32  # every ResBlock and transformer normalises with GroupNorm(32, width)


@dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of an ldm-family ControlNet (the trainable copy of a UNet encoder + middle block)."""

    model_channels: int = 320  # width of level 0 (SD1.x/SD2.x/SDXL: 320)
    in_channels: int = 4  # latent channels fed to input_blocks.0
    hint_channels: int = 3  # channels of the condition image (RGB: 3)
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of level i = model_channels * channel_mult[i]
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)  # ResBlocks per level
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # transformer blocks after each ResBlock of a level
    transformer_depth_middle: int = 1  # -1: the middle block is a single ResBlock
    context_dim: Optional[int] = 768  # cross-attention width: 768 SD1.x, 1024 SD2.x, 2048 SDXL
    use_linear_in_transformer: bool = False  # SD2.x/SDXL project with Linear, SD1.x with 1x1 conv
    num_heads: int = 8  # -1: use num_head_channels
    num_head_channels: int = -1  # -1: use num_heads
    adm_in_channels: Optional[int] = None  # SDXL: width of the `y` vector fed to label_emb (2816)
    time_embed_dim: Optional[int] = None  # default 4 * model_channels
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)  # widths inside input_hint_block
    global_average_pooling: bool = False  # shuffle models: residuals are averaged over H, W
    union_types: int = 0  # union ControlNets (xinsir ControlNet++): control types trained (6, ProMax 8); 0: not a union
    union_layers: int = 1  # union ControlNets: blocks in `transformer_layes`
    union_type_dim: int = 256  # union ControlNets: sinusoidal width per type in `control_add_embedding` (SDXL: 256)

    def __post_init__(self) -> None:
        """Refuse impossible architectures at construction, so no later division, GroupNorm or loop meets them."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "tuple[int, ...]" and isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            problem = _type_problem(f.type, value)
            if problem:
                raise ControlNetError(f"ControlNetConfig.{f.name} = {value!r}: {problem}.")
        problems = _value_problems(self)
        if problems:
            raise ControlNetError("impossible ControlNetConfig: " + "; ".join(problems) + ".")

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.model_channels

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of a transformer of this width."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def family(self) -> str:
        """A human name for messages; never used to decide behaviour."""
        if self.union_types:
            return f"SDXL-like union with {self.union_types} control types (context {self.context_dim}, label_emb {self.adm_in_channels})"
        if self.adm_in_channels:
            return f"SDXL-like (context {self.context_dim}, label_emb {self.adm_in_channels})"
        if self.context_dim == 768:
            return "SD1.x-like (context 768)"
        if self.context_dim == 1024:
            return "SD2.x-like (context 1024)"
        return f"ldm UNet (context {self.context_dim})"

    def summary(self) -> str:
        """The architecture in a few words, for messages."""
        return f"{len(self.channel_mult)} levels of widths {self.level_channels} with {self.num_res_blocks} ResBlocks"

    def _visible(self) -> dict:
        """The fields the weights' shapes show (head counts and pooling are not among them)."""
        v = {n: getattr(self, n) for n in ("model_channels", "in_channels", "hint_channels", "channel_mult", "num_res_blocks",
                                           "transformer_depth", "transformer_depth_middle", "adm_in_channels", "hint_block_channels", "union_types")}
        v["time embedding width"] = self.emb_dim
        if any(d > 0 for d in self.transformer_depth) or self.transformer_depth_middle > 0:
            v.update(context_dim=self.context_dim, use_linear_in_transformer=self.use_linear_in_transformer)
        if self.union_types:
            v.update(union_layers=self.union_layers, union_type_dim=self.union_type_dim)
        return v

    def shape_differences(self, other: "ControlNetConfig") -> list[str]:
        """Where `other` (e.g. derived from the tensors) differs in what weights show, as "field X (tensors: Y)"."""
        mine, theirs = self._visible(), other._visible()
        return [f"{k} {mine.get(k)!r} (tensors: {theirs.get(k)!r})" for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ControlNetConfig":
        """Parse `to_json`'s text; unknown fields are ignored (a newer version may add some).

        Raises `ControlNetError` for anything else: bad or too deeply nested JSON, not an object, a field of the
        wrong type, an impossible architecture."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ControlNetError(f"not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise ControlNetError(f"expected a JSON object of ControlNetConfig fields, found a {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _type_problem(kind: str, value) -> Optional[str]:
    """What is wrong with `value` for a field annotated `kind` (the annotation's text), or None."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ok = {
        "int": is_int(value),
        "Optional[int]": value is None or is_int(value),
        "bool": isinstance(value, bool),
        "tuple[int, ...]": isinstance(value, tuple) and all(is_int(v) for v in value),
    }.get(kind, True)
    return None if ok else f"expected {kind}"


def _value_problems(c: "ControlNetConfig") -> list[str]:
    out = []
    sizes = {"model_channels": c.model_channels, "in_channels": c.in_channels, "hint_channels": c.hint_channels,
             "union_layers": c.union_layers, "union_type_dim": c.union_type_dim,
             **{n: v for n in ("context_dim", "adm_in_channels", "time_embed_dim") if (v := getattr(c, n)) is not None}}
    out += [f"{n} = {v} is not in 1..{_MAX_SIZE}" for n, v in sizes.items() if not 1 <= v <= _MAX_SIZE]
    counts = {"channel_mult": (c.channel_mult, 1), "num_res_blocks": (c.num_res_blocks, 1), "transformer_depth": (c.transformer_depth, 0)}
    out += [f"{n} = {v} must hold values in {low}..{_MAX_SIZE}" for n, (v, low) in counts.items() if not all(low <= x <= _MAX_SIZE for x in v)]
    if not c.channel_mult or len(c.num_res_blocks) != len(c.channel_mult) or len(c.transformer_depth) != len(c.channel_mult):
        out.append(f"channel_mult {c.channel_mult}, num_res_blocks {c.num_res_blocks} and transformer_depth {c.transformer_depth} "
                   "need one entry per level (at least one level)")
    if len(c.hint_block_channels) != 4 or not all(1 <= x <= _MAX_SIZE for x in c.hint_block_channels):
        out.append(f"hint_block_channels = {c.hint_block_channels} needs 4 widths in 1..{_MAX_SIZE}")
    if not -1 <= c.transformer_depth_middle <= _MAX_SIZE:
        out.append(f"transformer_depth_middle = {c.transformer_depth_middle} is not in -1..{_MAX_SIZE}")
    if not 0 <= c.union_types <= _MAX_SIZE:
        out.append(f"union_types = {c.union_types} is not in 0..{_MAX_SIZE}")
    if out:
        return out
    widths = [c.model_channels] + [c.model_channels * m for m in c.channel_mult]
    out += [f"width {w} is not a multiple of {_GROUPS} (GroupNorm groups)" for w in sorted(set(widths)) if w % _GROUPS]
    per_head = c.num_head_channels if c.num_head_channels > 0 else c.num_heads
    if per_head < 1:
        out.append(f"num_heads = {c.num_heads} and num_head_channels = {c.num_head_channels}: one of them must be positive")
    else:
        attn = {c.model_channels * m for m, d in zip(c.channel_mult, c.transformer_depth) if d > 0}
        if c.transformer_depth_middle > 0:
            attn.add(c.model_channels * c.channel_mult[-1])
        what = "channels per head" if c.num_head_channels > 0 else "heads"
        out += [f"transformer width {w} does not split into {per_head} {what}" for w in sorted(attn) if w % per_head]
    return out


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str, ranks: tuple[int, ...] = (4,)) -> tuple[int, ...]:
    """The shape of `key`, checked to have one of `ranks` dimensions, none of them 0 (a derivation divides by them)."""
    if key not in sd:
        raise CheckpointError(f"{source}: no '{key}', which the architecture needs.")
    shape = tuple(sd[key].shape)
    if len(shape) not in ranks or min(shape, default=0) < 1:
        raise CheckpointError(f"{source}: '{key}' has shape {list(shape)}; expected {' or '.join(map(str, ranks))} non-zero dimensions.")
    return shape


def count_numbered(indices: Iterable[int], what: str, source: str) -> int:
    """How many numbered blocks there are, after checking they are numbered 0..n-1: a gap means a missing block, and
    a stray huge index must never size a model."""
    found = set(indices)
    n = max(found) + 1 if found else 0
    if len(found) != n:
        gaps = [str(i) for i in range(len(found) + 1) if i not in found][:5]
        raise CheckpointError(f"{source}: {what} are numbered up to {n - 1}, but {', '.join(gaps)}{' ...' if n - len(found) > 5 else ''} "
                              "are missing; the file is damaged.")
    return n


def _transformer_depth(sd: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    """Count `prefix.transformer_blocks.N` (0 when the layer is not a transformer)."""
    tb = prefix + "transformer_blocks."
    idx = (int(m[1]) for k in sd if k.startswith(tb) and (m := _INDEX.match(k, len(tb))))
    return count_numbered(idx, f"the transformer blocks of '{prefix[:-1]}'", source)


def config_from_unet_like_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    hint_channels: Optional[int] = None,
    num_heads: Optional[int] = None,
    num_head_channels: Optional[int] = None,
    global_average_pooling: bool = False,
    source: str = "state dict",
) -> ControlNetConfig:
    """Derive the architecture from canonical (ldm, unprefixed) keys of a ControlNet or a UNet.

    Works for UNet state dicts too (the encoder keys are the same), which is how a ControlNet is
    created from a base model.
    """
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{source}: no 'input_blocks.0.0.weight' key; cannot derive the ControlNet architecture.")
    mc, in_ch = _shape(sd, "input_blocks.0.0.weight", source)[:2]
    n_blocks = max(int(m.group(1)) for k in sd if (m := _INPUT_BLOCK.match(k))) + 1

    channel_mult: list[int] = []
    num_res: list[int] = []
    depth: list[int] = []
    context_dim = None
    linear = False
    count = 0
    cur_mult = 1
    for i in range(1, n_blocks):
        p = f"input_blocks.{i}."
        if p + "0.op.weight" in sd:  # downsample closes a level
            channel_mult.append(cur_mult)
            num_res.append(count)
            count = 0
            continue
        if p + "0.out_layers.3.weight" not in sd:
            raise CheckpointError(f"{source}: input block {i} is neither a ResBlock nor a Downsample (no '{p}0.out_layers.3.weight').")
        out_ch = _shape(sd, p + "0.out_layers.3.weight", source)[0]
        if out_ch % mc:
            raise CheckpointError(f"{source}: input block {i} is {out_ch} wide, not a multiple of the first block's {mc}.")
        cur_mult = out_ch // mc
        if count == 0:
            depth.append(_transformer_depth(sd, p + "1.", source))
        count += 1
        if context_dim is None and p + "1.transformer_blocks.0.attn2.to_k.weight" in sd:
            context_dim = _shape(sd, p + "1.transformer_blocks.0.attn2.to_k.weight", source, (2,))[1]
            linear = len(_shape(sd, p + "1.proj_in.weight", source, (2, 4))) == 2
    channel_mult.append(cur_mult)
    num_res.append(count)
    if len(depth) < len(channel_mult):  # a level made only of a downsample is impossible; guard anyway
        raise CheckpointError(f"{source}: could not read the transformer depth of every level.")

    # ComfyUI's convention: -1 means the middle block is a single ResBlock (no transformer, no second ResBlock)
    mid_depth = _transformer_depth(sd, "middle_block.1.", source) if "middle_block.1.norm.weight" in sd else -1
    if context_dim is None and mid_depth > 0:
        context_dim = _shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", source, (2,))[1]
        linear = len(_shape(sd, "middle_block.1.proj_in.weight", source, (2, 4))) == 2

    if hint_channels is None:
        if "input_hint_block.0.weight" not in sd:
            raise CheckpointError(f"{source}: no 'input_hint_block.0.weight'; this is not a ControlNet (pass hint_channels to build one).")
        hint_channels = _shape(sd, "input_hint_block.0.weight", source)[1]
    hint_widths = tuple(_shape(sd, f"input_hint_block.{i}.weight", source)[0] for i in (2, 6, 10, 12)) if "input_hint_block.12.weight" in sd else (16, 32, 96, 256)

    if num_heads is None and num_head_channels is None:
        num_heads, num_head_channels = (-1, 64) if linear else (8, -1)
    elif num_heads is None:
        num_heads = -1
    elif num_head_channels is None:
        num_head_channels = -1

    adm = _shape(sd, "label_emb.0.0.weight", source, (2,))[1] if "label_emb.0.0.weight" in sd else None
    union_types = _shape(sd, "task_embedding", source, (2,))[0] if "task_embedding" in sd else 0
    union_layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_layes.")}) if union_types else 1
    union_type_dim = _shape(sd, "control_add_embedding.linear_1.weight", source, (2,))[1] // union_types if union_types else 256
    emb_dim = _shape(sd, "time_embed.0.weight", source, (2,))[0] if "time_embed.0.weight" in sd else None
    fields = dict(
        model_channels=mc,
        in_channels=in_ch,
        hint_channels=hint_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=tuple(num_res),
        transformer_depth=tuple(depth),
        transformer_depth_middle=mid_depth,
        context_dim=context_dim,
        use_linear_in_transformer=linear,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        adm_in_channels=adm,
        time_embed_dim=emb_dim if emb_dim != 4 * mc else None,
        hint_block_channels=hint_widths,
        global_average_pooling=global_average_pooling,
        union_types=union_types,
        union_layers=union_layers,
        union_type_dim=union_type_dim,
    )
    try:
        return ControlNetConfig(**fields)
    except ControlNetError as e:
        raise CheckpointError(f"{source}: the tensor shapes describe no valid ControlNet ({e})") from None
