"""The InstantX layout of Qwen-Image ControlNets (diffusers' `QwenImageControlNetModel`): detection by signature
keys and the architecture derived from tensor shapes.

Keys: `img_in`, `txt_in`, `txt_norm`, `time_text_embed.timestep_embedder`, `transformer_blocks.N` (`img_mod.1`,
`txt_mod.1`, `attn.*`, `img_mlp`, `txt_mlp`), `controlnet_blocks.N`, `controlnet_x_embedder` (64 features, 68 for
inpainting). The union file has exactly these keys (no control-type embedding).

Not this layout: the Qwen-Image base transformer (no `controlnet_*` keys), Flux InstantX ControlNets (`x_embedder`,
`context_embedder`), DiffSynth's blockwise Qwen-Image ControlNets (`controlnet_blocks.N.x_rms`, no text path; a model
patch in ComfyUI).

The keys already are our parameter names (`controlnet_core.qwen` models are built like the checkpoints), so there is
no key table. Messages name no file: the loader puts the file's name in front.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..checkpoint import TensorSource
from ..errors import CheckpointError, ControlNetError
from ..flux.config import scaled_axes_dims
from ..loading import LoadedControl, LoadOptions, finish_load, float_reader, strict_fill
from ..qwen.config import PATCH, TIME_FREQ_DIM, QwenControlNetConfig
from .record import Format
from .shapes import compute_dtype, count_blocks, expect, save_state_dict, shape_of

# The Qwen-Image transformer's own names (text RMSNorm, `img_in` / `txt_in`, `img_mod` / `img_mlp` blocks) with the
# ControlNet's hint projection and output layers.
SIGNATURE = (
    "img_in.weight",
    "txt_in.weight",
    "txt_norm.weight",
    "controlnet_x_embedder.weight",
    "transformer_blocks.0.img_mod.1.weight",
    "transformer_blocks.0.img_mlp.net.0.proj.weight",
    "controlnet_blocks.0.weight",
)


def is_qwen_instantx(keys: Iterable[str]) -> bool:
    """True for the key set of an InstantX-layout (diffusers) Qwen-Image ControlNet."""
    keys = set(keys)
    return all(k in keys for k in SIGNATURE)


# shape helpers


Shapes = Mapping[str, Sequence[int]]



def _shape(shapes, key: str, rank: int) -> tuple[int, ...]:
    return shape_of(shapes, key, rank, 'a Qwen-Image ControlNet')


def _expect(shapes, key: str, expected: tuple[int, ...], why: str) -> None:
    expect(shapes, key, expected, why, 'a Qwen-Image ControlNet')


_count = count_blocks

def _linear(shapes: Shapes, prefix: str, out_f: int, in_f: int, why: str) -> None:
    _expect(shapes, prefix + ".weight", (out_f, in_f), why)
    _expect(shapes, prefix + ".bias", (out_f,), "one bias per output")


def config_from_shapes(shapes: Shapes) -> QwenControlNetConfig:
    """The `QwenControlNetConfig` the tensor shapes describe (`shapes`: key -> shape, e.g. from a file's header).

    Raises `CheckpointError` naming the first key whose shape does not fit the others, or when the keys are no
    Qwen-Image ControlNet's.
    """
    if not is_qwen_instantx(shapes):
        raise CheckpointError("the keys are not those of a Qwen-Image ControlNet (InstantX / diffusers layout).")
    hidden, in_ch = _shape(shapes, "img_in.weight", 2)
    _expect(shapes, "img_in.bias", (hidden,), "one bias per channel")
    if in_ch % (PATCH * PATCH):
        raise CheckpointError(f"'img_in.weight' takes {in_ch} features; a token packs 2x2 latent pixels, so a multiple of 4.")
    hint_ch = _shape(shapes, "controlnet_x_embedder.weight", 2)[1]
    _linear(shapes, "controlnet_x_embedder", hidden, hint_ch, "the model's width")
    if hint_ch < in_ch or hint_ch % (PATCH * PATCH):
        raise CheckpointError(f"'controlnet_x_embedder.weight' takes {hint_ch} hint features; expected the latent's {in_ch}, "
                              "or more for inpainting (a packed keep mask), in whole 2x2 packed pixels.")

    t = "time_text_embed.timestep_embedder."
    _linear(shapes, t + "linear_1", hidden, TIME_FREQ_DIM, "a 256-wide timestep embedding")
    _linear(shapes, t + "linear_2", hidden, hidden, "the model's width")
    (joint,) = _shape(shapes, "txt_norm.weight", 1)
    _linear(shapes, "txt_in", hidden, joint, f"from the {joint}-wide text tokens 'txt_norm.weight' normalises")

    depth = _count(shapes, "transformer_blocks")
    if depth == 0:
        raise CheckpointError("no 'transformer_blocks.0.*' keys; a Qwen-Image ControlNet has at least one block.")
    found = _count(shapes, "controlnet_blocks")
    if found != depth:
        raise CheckpointError(f"{depth} blocks but {found} 'controlnet_blocks'; each block has one output layer.")

    key = "transformer_blocks.0.attn.norm_q.weight"
    (head_dim,) = _shape(shapes, key, 1)
    if hidden % head_dim:
        raise CheckpointError(f"'{key}' makes heads {head_dim} wide, which does not divide the model's width {hidden}.")
    if not scaled_axes_dims(head_dim):
        raise CheckpointError(f"'{key}' makes heads {head_dim} wide, which Qwen-Image's rotary split (1/8, 7/16, 7/16 "
                              "of a head, in even sizes) cannot divide.")
    mlp = _shape(shapes, "transformer_blocks.0.img_mlp.net.0.proj.weight", 2)[0]
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        _linear(shapes, b + "img_mod.1", 6 * hidden, hidden, "adaLN shift, scale and gate of attention and feed-forward")
        _linear(shapes, b + "txt_mod.1", 6 * hidden, hidden, "adaLN vectors of the text stream")
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(shapes, b + "attn." + name, hidden, hidden, "the model's width")
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _expect(shapes, b + f"attn.{name}.weight", (head_dim,), f"RMSNorm per {head_dim}-wide head, as in block 0")
        for ff in ("img_mlp", "txt_mlp"):
            _linear(shapes, b + ff + ".net.0.proj", mlp, hidden, "the feed-forward width of block 0")
            _linear(shapes, b + ff + ".net.2", hidden, mlp, "back to the model's width")
        _linear(shapes, f"controlnet_blocks.{i}", hidden, hidden, "the model's width")

    try:
        return QwenControlNetConfig(hidden_size=hidden, head_dim=head_dim, num_layers=depth, in_channels=in_ch,
                                    hint_channels=hint_ch, joint_attention_dim=joint, mlp_hidden_dim=mlp)
    except ControlNetError as e:
        raise CheckpointError(f"the tensor shapes describe no valid Qwen-Image ControlNet ({e})") from None


log = logging.getLogger(__name__)


def _compute_dtype(source: TensorSource, options: LoadOptions) -> torch.dtype:
    return compute_dtype(source.stored_dtype("img_in.weight"), options.dtype)


def load(source: TensorSource, options: LoadOptions) -> LoadedControl:
    """The keys are our parameter names. fp8 tensors are cast one by one on reading, into the compute dtype, or stay
    fp8 with `keep_fp8`."""
    from ..qwen import build_qwen_controlnet

    keys = list(source.keys())
    config = config_from_shapes({k: source.shape(k) for k in keys})
    dtype = _compute_dtype(source, options)
    with torch.device("meta"):
        model = build_qwen_controlnet(config, dtype=dtype)
    read = float_reader(model, source, dtype, options.keep_fp8)
    strict_fill(model, lambda k: read(k, k), set(keys), source.name, FORMAT.name)
    finish_load(model, options, dtype)
    log.info("loaded %s as '%s': %s", source.name, FORMAT.name, config.summary())
    return LoadedControl(model, FORMAT.name, source.name)


def save(model, path: Path, dtype: Optional[torch.dtype], overwrite: bool) -> Path:
    """One .safetensors file with diffusers' keys (what InstantX publish); diffusers reads it with a config.json."""
    return save_state_dict(model, path, dtype, overwrite)


FORMAT = Format("qwen-instantx", "Qwen-Image ControlNet, diffusers layout (InstantX canny / depth / union, inpainting)",
                SIGNATURE, is_qwen_instantx, load, save, kind="qwen_controlnet", takes_latent_hint=True,
                inference_dtypes=("bfloat16", "float32"))
