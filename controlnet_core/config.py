"""`ControlNetConfig`, derived from tensor shapes so that scaled-down checkpoints load like full ones.

Head counts are the one setting the weights cannot show. The convention of the ldm family is used:
a transformer with 1x1-conv projections (SD1.x) has 8 heads; one with linear projections (SD2.x,
SDXL) has 64 channels per head. A diffusers `config.json` or our own safetensors metadata overrides it.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .errors import CheckpointError

_INPUT_BLOCK = re.compile(r"^input_blocks\.(\d+)\.")


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

    @property
    def num_input_blocks(self) -> int:
        return 1 + sum(self.num_res_blocks) + len(self.channel_mult) - 1

    def input_block_channels(self) -> list[int]:
        """Output width of every input block: the width of the zero conv at that index."""
        chans = [self.model_channels]
        for level, ch in enumerate(self.level_channels):
            chans += [ch] * self.num_res_blocks[level]
            if level != len(self.channel_mult) - 1:
                chans.append(ch)
        return chans

    def input_block_downsampling(self) -> list[int]:
        """Downsampling factor (relative to the latent) after every input block."""
        out, f = [1], 1
        for level in range(len(self.channel_mult)):
            out += [f] * self.num_res_blocks[level]
            if level != len(self.channel_mult) - 1:
                f *= 2
                out.append(f)
        return out

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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ControlNetConfig":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kwargs)


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _transformer_depth(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Count `prefix.transformer_blocks.N` (0 when the layer is not a transformer)."""
    tb = prefix + "transformer_blocks."
    idx = {int(k[len(tb):].split(".")[0]) for k in sd if k.startswith(tb)}
    return max(idx) + 1 if idx else 0


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
    mc, in_ch = _shape(sd, "input_blocks.0.0.weight")[:2]
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
        out_ch = _shape(sd, p + "0.out_layers.3.weight")[0]
        cur_mult = out_ch // mc
        if count == 0:
            depth.append(_transformer_depth(sd, p + "1."))
        count += 1
        if context_dim is None and p + "1.transformer_blocks.0.attn2.to_k.weight" in sd:
            context_dim = _shape(sd, p + "1.transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(_shape(sd, p + "1.proj_in.weight")) == 2
    channel_mult.append(cur_mult)
    num_res.append(count)
    if len(depth) < len(channel_mult):  # a level made only of a downsample is impossible; guard anyway
        raise CheckpointError(f"{source}: could not read the transformer depth of every level.")

    # ComfyUI's convention: -1 means the middle block is a single ResBlock (no transformer, no second ResBlock)
    mid_depth = _transformer_depth(sd, "middle_block.1.") if "middle_block.1.norm.weight" in sd else -1
    if context_dim is None and mid_depth > 0:
        context_dim = _shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
        linear = len(_shape(sd, "middle_block.1.proj_in.weight")) == 2

    if hint_channels is None:
        if "input_hint_block.0.weight" not in sd:
            raise CheckpointError(f"{source}: no 'input_hint_block.0.weight'; this is not a ControlNet (pass hint_channels to build one).")
        hint_channels = _shape(sd, "input_hint_block.0.weight")[1]
    hint_widths = tuple(_shape(sd, f"input_hint_block.{i}.weight")[0] for i in (2, 6, 10, 12)) if "input_hint_block.12.weight" in sd else (16, 32, 96, 256)

    if num_heads is None and num_head_channels is None:
        num_heads, num_head_channels = (-1, 64) if linear else (8, -1)
    elif num_heads is None:
        num_heads = -1
    elif num_head_channels is None:
        num_head_channels = -1

    adm = _shape(sd, "label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in sd else None
    union_types = _shape(sd, "task_embedding")[0] if "task_embedding" in sd else 0
    union_layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_layes.")}) if union_types else 1
    union_type_dim = _shape(sd, "control_add_embedding.linear_1.weight")[1] // union_types if union_types else 256
    emb_dim = _shape(sd, "time_embed.0.weight")[0] if "time_embed.0.weight" in sd else None
    return ControlNetConfig(
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
