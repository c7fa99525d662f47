"""The diffusers layout of SD3 / SD3.5 ControlNets (diffusers' `SD3ControlNetModel`): detection by signature keys
and the architecture derived from tensor shapes.

The keys already are our parameter names (`controlnet_core.mmdit.SD3ControlNet` is built like the checkpoint), so
there is no key table. Messages name no file: the loader puts the file's name in front.

Not this layout: Stability's own SD3.5 ControlNets (`transformer_blocks.N.adaLN_modulation.*`, loaded by ComfyUI's
`load_controlnet_sd35`) and diffusers' conversion of the SD3.5 large ones, which has neither `pos_embed` nor
`context_embedder`: it takes the base model's patch embedding and its blocks attend over image tokens only.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..checkpoint import TensorSource
from ..errors import CheckpointError, ControlNetError
from ..loading import LoadedControl, LoadOptions, finish_load, first_float_dtype, float_reader, strict_fill
from ..mmdit.config import HEAD_DIM, TIME_FREQ_DIM, SD3ControlNetConfig
from ..mmdit.sd3_control import SD3ControlNet
from .record import Format
from .shapes import compute_dtype, count_blocks, expect, save_state_dict, shape_of

log = logging.getLogger(__name__)

# Present in every diffusers SD3 ControlNet, and together in no other layout: the hint projection, the joint
# (two-stream) attention, and the image patch embedding of its own.
SIGNATURE = (
    "pos_embed_input.proj.weight",
    "pos_embed.proj.weight",
    "context_embedder.weight",
    "transformer_blocks.0.attn.add_q_proj.weight",
    "controlnet_blocks.0.weight",
)



def is_sd3_diffusers(keys: Iterable[str]) -> bool:
    """True for the key set of a diffusers-layout SD3 / SD3.5 ControlNet."""
    keys = set(keys)
    return all(k in keys for k in SIGNATURE)



def _shape(shapes, key: str, rank: int) -> tuple[int, ...]:
    return shape_of(shapes, key, rank, 'an SD3 ControlNet')


def _expect(shapes, key: str, expected: tuple[int, ...], why: str) -> None:
    expect(shapes, key, expected, why, 'an SD3 ControlNet')


_count = count_blocks

def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> SD3ControlNetConfig:
    """The `SD3ControlNetConfig` the tensor shapes describe (`shapes`: key -> shape, e.g. from a file's header).

    Raises `CheckpointError` naming the first key whose shape does not fit the others.
    """
    hidden, in_ch, p, p2 = _shape(shapes, "pos_embed.proj.weight", 4)
    if p != p2:
        raise CheckpointError(f"'pos_embed.proj.weight' has a {p}x{p2} patch; SD3 patches are square.")
    if hidden % HEAD_DIM:
        raise CheckpointError(f"'pos_embed.proj.weight' makes the model {hidden} wide, not a multiple of the SD3 head width {HEAD_DIM}.")
    _expect(shapes, "pos_embed.proj.bias", (hidden,), "one bias per channel")

    _, cells, width = _shape(shapes, "pos_embed.pos_embed", 3)
    side = math.isqrt(cells)
    if side * side != cells or width != hidden or shapes["pos_embed.pos_embed"][0] != 1:
        raise CheckpointError(f"'pos_embed.pos_embed' has shape {list(shapes['pos_embed.pos_embed'])}; expected [1, side*side, {hidden}] "
                              "(a square grid of positional embeddings).")

    control_ch = _shape(shapes, "pos_embed_input.proj.weight", 4)[1]
    _expect(shapes, "pos_embed_input.proj.weight", (hidden, control_ch, p, p), f"the hint is cut into the latent's {p}x{p} patches")
    if control_ch < in_ch:
        raise CheckpointError(f"'pos_embed_input.proj.weight' takes {control_ch} hint channels, fewer than the latent's {in_ch}.")
    _expect(shapes, "pos_embed_input.proj.bias", (hidden,), "one bias per channel")

    _expect(shapes, "time_text_embed.timestep_embedder.linear_1.weight", (hidden, TIME_FREQ_DIM), "a 256-wide timestep embedding")
    pooled = _shape(shapes, "time_text_embed.text_embedder.linear_1.weight", 2)[1]
    _expect(shapes, "time_text_embed.text_embedder.linear_1.weight", (hidden, pooled), "the model's width")
    context_out, joint_dim = _shape(shapes, "context_embedder.weight", 2)
    if context_out != hidden:
        raise CheckpointError(f"'context_embedder.weight' projects text to {context_out} channels; the joint attention needs the model's {hidden}.")

    depth = _count(shapes, "transformer_blocks")
    n_out = _count(shapes, "controlnet_blocks")
    if depth == 0:
        raise CheckpointError("no 'transformer_blocks.0.*' keys; an SD3 ControlNet has at least one block.")
    if n_out != depth:
        raise CheckpointError(f"{depth} transformer blocks but {n_out} controlnet_blocks; each block has one output layer.")

    mlp = _shape(shapes, "transformer_blocks.0.ff.net.0.proj.weight", 2)[0]
    qk_norm = "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in shapes else None
    dual = []
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        is_dual = b + "attn2.to_q.weight" in shapes
        dual += [i] if is_dual else []
        _expect(shapes, b + "norm1.linear.weight", ((9 if is_dual else 6) * hidden, hidden),
                "adaLN shift, scale and gate vectors" + (" for three sub-layers (dual attention)" if is_dual else ""))
        _expect(shapes, b + "norm1_context.linear.weight", (6 * hidden, hidden),
                "adaLN vectors for the text stream; a ControlNet block keeps its text output layers")
        _expect(shapes, b + "attn.to_q.weight", (hidden, hidden), "the model's width")
        _expect(shapes, b + "ff.net.0.proj.weight", (mlp, hidden), "the feed-forward width of block 0")
        _expect(shapes, b + "ff_context.net.0.proj.weight", (mlp, hidden), "the feed-forward width of block 0")
        if qk_norm:
            _expect(shapes, b + "attn.norm_q.weight", (HEAD_DIM,), "RMSNorm per 64-wide head, as in block 0")
        _expect(shapes, f"controlnet_blocks.{i}.weight", (hidden, hidden), "the model's width")

    try:
        return SD3ControlNetConfig(
            hidden_size=hidden, num_layers=depth, patch_size=p, in_channels=in_ch, control_channels=control_ch,
            pooled_projection_dim=pooled, joint_attention_dim=joint_dim, pos_embed_max_size=side, mlp_hidden_dim=mlp,
            qk_norm=qk_norm, dual_attention_layers=tuple(dual),
        )
    except ControlNetError as e:
        raise CheckpointError(f"the tensor shapes describe no valid SD3 ControlNet ({e})") from None


def load(source: TensorSource, options: LoadOptions) -> LoadedControl:
    """The keys already are our parameter names: no key table."""
    keys = list(source.keys())
    config = config_from_shapes({k: source.shape(k) for k in keys})
    dtype = compute_dtype(first_float_dtype(source, "pos_embed.proj.weight"), options.dtype)
    with torch.device("meta"):
        model = SD3ControlNet(config, dtype=dtype)
    read = float_reader(model, source, dtype, options.keep_fp8)
    strict_fill(model, lambda k: read(k, k), set(keys), source.name, FORMAT.name)
    finish_load(model, options, dtype)
    log.info("loaded %s as '%s': %s", source.name, FORMAT.name, config.summary())
    return LoadedControl(model, FORMAT.name, source.name)


def save(model: SD3ControlNet, path: Path, dtype: Optional[torch.dtype], overwrite: bool) -> Path:
    """One .safetensors file with diffusers' keys (what InstantX publish); diffusers reads it with a config.json."""
    return save_state_dict(model, path, dtype, overwrite)


FORMAT = Format("sd3-diffusers", "SD3 / SD3.5 ControlNet, diffusers layout (InstantX canny / pose / tile, alimama inpainting)",
                SIGNATURE, is_sd3_diffusers, load, save, kind="sd3_controlnet", takes_latent_hint=True)
