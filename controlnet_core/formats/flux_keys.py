"""The Flux ControlNet layouts: detection by signature keys and the architecture derived from tensor shapes.

- InstantX / Shakker-Labs / alimama (diffusers' `FluxControlNetModel`): `x_embedder`, `controlnet_x_embedder`,
  `transformer_blocks`, `single_transformer_blocks` (none in Union Pro 2.0), `controlnet_blocks`,
  `controlnet_single_blocks`, optionally `controlnet_mode_embedder` (union) and `input_hint_block.conv_in` (diffusers'
  conversion of XLabs files);
- XLabs (x-flux): BFL names, `img_in`, `double_blocks`, `controlnet_blocks`, `pos_embed_input`, `input_hint_block.0`;
- MistoLine: BFL names, `controlnet_blocks.N.linear`, `single_blocks`, `single_controlnet_blocks`, `input_cond_block`.

The keys already are our parameter names (`controlnet_core.flux` models are built like the checkpoints), so there is
no key table. Messages name no file: the loader puts the file's name in front.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..checkpoint import TensorSource
from ..errors import CheckpointError, ControlNetError
from ..flux.config import HINT_ENCODER_CHANNELS, PATCH, TIME_FREQ_DIM, FluxControlNetConfig, scaled_axes_dims
from ..flux.layers import MISTOLINE_HINT_CONVS, XLABS_HINT_CONVS
from ..loading import LoadedControl, LoadOptions, finish_load, float_reader, strict_fill
from .record import Format
from .shapes import compute_dtype, count_blocks, expect, save_state_dict, shape_of

# The diffusers names of a Flux transformer (its own `x_embedder` and two-stream attention) with the ControlNet's
# hint projection and output layers. SD3 ControlNets have `pos_embed` instead of `x_embedder`, Qwen-Image ones `img_in`.
SIGNATURE_INSTANTX = (
    "x_embedder.weight",
    "controlnet_x_embedder.weight",
    "context_embedder.weight",
    "transformer_blocks.0.attn.add_q_proj.weight",
    "transformer_blocks.0.attn.norm_added_q.weight",
    "controlnet_blocks.0.weight",
)
# BFL names of a Flux transformer with a hint projection, output layers and XLabs' pixel-space encoder.
SIGNATURE_XLABS = (
    "img_in.weight",
    "txt_in.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "controlnet_blocks.0.weight",
    "pos_embed_input.weight",
    "input_hint_block.0.weight",
)
# The same for MistoLine: its own encoder and `Linear -> SiLU` output layers.
SIGNATURE_MISTOLINE = (
    "img_in.weight",
    "txt_in.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "controlnet_blocks.0.linear.weight",
    "pos_embed_input.weight",
    "input_cond_block.encoder.0.weight",
)


def is_flux_instantx(keys: Iterable[str]) -> bool:
    """True for the key set of a diffusers-layout (InstantX / Shakker / alimama) Flux ControlNet."""
    keys = set(keys)
    return all(k in keys for k in SIGNATURE_INSTANTX)


def is_flux_xlabs(keys: Iterable[str]) -> bool:
    """True for the key set of an XLabs-layout Flux ControlNet."""
    keys = set(keys)
    return all(k in keys for k in SIGNATURE_XLABS)


def is_flux_mistoline(keys: Iterable[str]) -> bool:
    """True for the key set of a MistoLine Flux ControlNet."""
    keys = set(keys)
    return all(k in keys for k in SIGNATURE_MISTOLINE)


def flux_layout(keys: Iterable[str]) -> str | None:
    """"instantx", "xlabs", "mistoline", or None when the keys are no Flux ControlNet's."""
    keys = set(keys)
    for name, test in (("instantx", is_flux_instantx), ("xlabs", is_flux_xlabs), ("mistoline", is_flux_mistoline)):
        if test(keys):
            return name
    return None


# shape helpers


Shapes = Mapping[str, Sequence[int]]



def _shape(shapes, key: str, rank: int) -> tuple[int, ...]:
    return shape_of(shapes, key, rank, 'this Flux ControlNet layout')


def _expect(shapes, key: str, expected: tuple[int, ...], why: str) -> None:
    expect(shapes, key, expected, why, 'this Flux ControlNet layout')


_count = count_blocks

def _linear(shapes: Shapes, prefix: str, out_f: int, in_f: int, why: str, bias: bool = True) -> None:
    _expect(shapes, prefix + ".weight", (out_f, in_f), why)
    if bias:
        _expect(shapes, prefix + ".bias", (out_f,), "one bias per output")


def _head_dim(shapes: Shapes, key: str, hidden: int) -> int:
    (head_dim,) = _shape(shapes, key, 1)
    if hidden % head_dim:
        raise CheckpointError(f"'{key}' makes heads {head_dim} wide, which does not divide the model's width {hidden}.")
    if not scaled_axes_dims(head_dim):
        raise CheckpointError(f"'{key}' makes heads {head_dim} wide, which Flux's rotary split (1/8, 7/16, 7/16 of a head, "
                              "in even sizes) cannot divide.")
    return head_dim


def _build(**fields) -> FluxControlNetConfig:
    try:
        return FluxControlNetConfig(**fields)
    except ControlNetError as e:
        raise CheckpointError(f"the tensor shapes describe no valid Flux ControlNet ({e})") from None


def _check_convs(shapes: Shapes, names: Sequence[str], specs) -> None:
    """A fixed conv stack: convolution i at `names[i]` with the spec's channels and kernel."""
    for i, (name, (cin, cout, k, _)) in enumerate(zip(names, specs)):
        _expect(shapes, name + ".weight", (cout, cin, k, k), f"convolution {i + 1} of the {len(specs)}-layer hint encoder")
        _expect(shapes, name + ".bias", (cout,), "one bias per channel")


def _check_sequential(shapes: Shapes, prefix: str, specs) -> None:
    """A conv stack stored as a Sequential with SiLUs between: convolutions at `prefix.0`, `.2`, `.4`, ..."""
    _check_convs(shapes, [f"{prefix}.{2 * i}" for i in range(len(specs))], specs)
    extra = f"{prefix}.{2 * len(specs)}.weight"
    if extra in shapes:
        raise CheckpointError(f"'{extra}': the hint encoder has more than its {len(specs)} convolutions.")


# InstantX


def _instantx_config(shapes: Shapes) -> FluxControlNetConfig:
    hidden, in_ch = _shape(shapes, "x_embedder.weight", 2)
    _expect(shapes, "x_embedder.bias", (hidden,), "one bias per channel")
    hint_ch = _shape(shapes, "controlnet_x_embedder.weight", 2)[1]
    _linear(shapes, "controlnet_x_embedder", hidden, hint_ch, "the model's width")

    encoder = 0
    if "input_hint_block.conv_in.weight" in shapes:
        inner = XLABS_HINT_CONVS[:-1]  # conv_out's width is the file's own
        _check_convs(shapes, ["input_hint_block.conv_in"] + [f"input_hint_block.blocks.{i}" for i in range(len(inner) - 1)], inner)
        encoder = _shape(shapes, "input_hint_block.conv_out.weight", 4)[0]
        _expect(shapes, "input_hint_block.conv_out.weight", (encoder, 16, 3, 3), "the hint encoder's last convolution")
        if hint_ch != encoder * PATCH * PATCH:
            raise CheckpointError(f"'controlnet_x_embedder.weight' takes {hint_ch} features, but the hint encoder's {encoder} "
                                  f"channels pack to {encoder * PATCH * PATCH}.")
    elif hint_ch < in_ch or hint_ch % (PATCH * PATCH):
        raise CheckpointError(f"'controlnet_x_embedder.weight' takes {hint_ch} hint features; expected the latent's {in_ch}, "
                              "or more for inpainting (a packed keep mask), in whole 2x2 packed pixels.")

    t = "time_text_embed."
    _linear(shapes, t + "timestep_embedder.linear_1", hidden, TIME_FREQ_DIM, "a 256-wide timestep embedding")
    _linear(shapes, t + "timestep_embedder.linear_2", hidden, hidden, "the model's width")
    guidance = t + "guidance_embedder.linear_1.weight" in shapes
    if guidance:
        _linear(shapes, t + "guidance_embedder.linear_1", hidden, TIME_FREQ_DIM, "a 256-wide guidance embedding")
        _linear(shapes, t + "guidance_embedder.linear_2", hidden, hidden, "the model's width")
    pooled = _shape(shapes, t + "text_embedder.linear_1.weight", 2)[1]
    _linear(shapes, t + "text_embedder.linear_1", hidden, pooled, "the model's width")
    _linear(shapes, t + "text_embedder.linear_2", hidden, hidden, "the model's width")
    context_out, joint = _shape(shapes, "context_embedder.weight", 2)
    if context_out != hidden:
        raise CheckpointError(f"'context_embedder.weight' projects text to {context_out} channels; "
                              f"the joint attention needs the model's {hidden}.")

    modes = 0
    if "controlnet_mode_embedder.weight" in shapes:
        modes = _shape(shapes, "controlnet_mode_embedder.weight", 2)[0]
        _expect(shapes, "controlnet_mode_embedder.weight", (modes, hidden), "one mode token of the model's width per mode")

    depth, single = _count(shapes, "transformer_blocks"), _count(shapes, "single_transformer_blocks")
    if depth == 0:
        raise CheckpointError("no 'transformer_blocks.0.*' keys; a Flux ControlNet has at least one double block.")
    for prefix, n in (("controlnet_blocks", depth), ("controlnet_single_blocks", single)):
        found = _count(shapes, prefix)
        if found != n:
            raise CheckpointError(f"{n} {'single' if 'single' in prefix else 'double'} blocks but {found} '{prefix}'; "
                                  "each block has one output layer.")

    head_dim = _head_dim(shapes, "transformer_blocks.0.attn.norm_q.weight", hidden)
    mlp = _shape(shapes, "transformer_blocks.0.ff.net.0.proj.weight", 2)[0]
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        _linear(shapes, b + "norm1.linear", 6 * hidden, hidden, "adaLN shift, scale and gate of attention and feed-forward")
        _linear(shapes, b + "norm1_context.linear", 6 * hidden, hidden, "adaLN vectors of the text stream")
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(shapes, b + "attn." + name, hidden, hidden, "the model's width")
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _expect(shapes, b + f"attn.{name}.weight", (head_dim,), f"RMSNorm per {head_dim}-wide head, as in block 0")
        for ff in ("ff", "ff_context"):
            _linear(shapes, b + ff + ".net.0.proj", mlp, hidden, "the feed-forward width of block 0")
            _linear(shapes, b + ff + ".net.2", hidden, mlp, "back to the model's width")
        _linear(shapes, f"controlnet_blocks.{i}", hidden, hidden, "the model's width")
    for i in range(single):
        b = f"single_transformer_blocks.{i}."
        _linear(shapes, b + "norm.linear", 3 * hidden, hidden, "adaLN shift, scale and gate")
        for name in ("to_q", "to_k", "to_v"):
            _linear(shapes, b + "attn." + name, hidden, hidden, "the model's width")
        for name in ("norm_q", "norm_k"):
            _expect(shapes, b + f"attn.{name}.weight", (head_dim,), f"RMSNorm per {head_dim}-wide head, as in block 0")
        _linear(shapes, b + "proj_mlp", mlp, hidden, "the feed-forward width of the double blocks")
        _linear(shapes, b + "proj_out", hidden, hidden + mlp, "attention and feed-forward outputs side by side")
        _linear(shapes, f"controlnet_single_blocks.{i}", hidden, hidden, "the model's width")

    return _build(layout="instantx", hidden_size=hidden, head_dim=head_dim, num_layers=depth, num_single_layers=single,
                  in_channels=in_ch, hint_channels=hint_ch, hint_encoder_channels=encoder, pooled_projection_dim=pooled,
                  joint_attention_dim=joint, mlp_hidden_dim=mlp, guidance_embeds=guidance, num_modes=modes)


# XLabs and MistoLine


def _bfl_config(shapes: Shapes, layout: str) -> FluxControlNetConfig:
    misto = layout == "mistoline"
    hidden, in_ch = _shape(shapes, "img_in.weight", 2)
    _expect(shapes, "img_in.bias", (hidden,), "one bias per channel")
    _linear(shapes, "time_in.in_layer", hidden, TIME_FREQ_DIM, "a 256-wide timestep embedding")
    _linear(shapes, "time_in.out_layer", hidden, hidden, "the model's width")
    guidance = "guidance_in.in_layer.weight" in shapes
    if guidance:
        _linear(shapes, "guidance_in.in_layer", hidden, TIME_FREQ_DIM, "a 256-wide guidance embedding")
        _linear(shapes, "guidance_in.out_layer", hidden, hidden, "the model's width")
    pooled = _shape(shapes, "vector_in.in_layer.weight", 2)[1]
    _linear(shapes, "vector_in.in_layer", hidden, pooled, "the model's width")
    _linear(shapes, "vector_in.out_layer", hidden, hidden, "the model's width")
    txt_out, joint = _shape(shapes, "txt_in.weight", 2)
    if txt_out != hidden:
        raise CheckpointError(f"'txt_in.weight' projects text to {txt_out} channels; the joint attention needs the model's {hidden}.")

    _linear(shapes, "pos_embed_input", hidden, HINT_ENCODER_CHANNELS * PATCH * PATCH,
            f"the hint encoder's {HINT_ENCODER_CHANNELS} channels, packed 2x2")
    if misto:
        _check_sequential(shapes, "input_cond_block.encoder", MISTOLINE_HINT_CONVS)
    else:
        _check_sequential(shapes, "input_hint_block", XLABS_HINT_CONVS)

    depth, single = _count(shapes, "double_blocks"), _count(shapes, "single_blocks")
    if depth == 0:
        raise CheckpointError("no 'double_blocks.0.*' keys; a Flux ControlNet has at least one double block.")
    if single and not misto:
        raise CheckpointError(f"'single_blocks.0.*' keys: XLabs ControlNets have double blocks only ({single} single blocks found).")
    out = ".linear" if misto else ""
    for prefix, n in (("controlnet_blocks", depth), ("single_controlnet_blocks", single)):
        found = _count(shapes, prefix)
        if found != n:
            raise CheckpointError(f"{n} {'single' if 'single' in prefix else 'double'} blocks but {found} '{prefix}'; "
                                  "each block has one output layer.")

    head_dim = _head_dim(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", hidden)
    mlp = _shape(shapes, "double_blocks.0.img_mlp.0.weight", 2)[0]
    qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    for i in range(depth):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}_"
            _linear(shapes, b + "mod.lin", 6 * hidden, hidden, f"adaLN vectors of the {stream} stream")
            _linear(shapes, b + "attn.qkv", 3 * hidden, hidden, "queries, keys and values", bias=qkv_bias)
            _linear(shapes, b + "attn.proj", hidden, hidden, "the model's width")
            for name in ("query_norm", "key_norm"):
                _expect(shapes, b + f"attn.norm.{name}.scale", (head_dim,), f"RMSNorm per {head_dim}-wide head, as in block 0")
            _linear(shapes, b + "mlp.0", mlp, hidden, "the feed-forward width of block 0")
            _linear(shapes, b + "mlp.2", hidden, mlp, "back to the model's width")
        _linear(shapes, f"controlnet_blocks.{i}{out}", hidden, hidden, "the model's width")
    for i in range(single):
        b = f"single_blocks.{i}."
        _linear(shapes, b + "modulation.lin", 3 * hidden, hidden, "adaLN shift, scale and gate")
        _linear(shapes, b + "linear1", 3 * hidden + mlp, hidden, "queries, keys, values and the feed-forward input")
        _linear(shapes, b + "linear2", hidden, hidden + mlp, "attention and feed-forward outputs side by side")
        for name in ("query_norm", "key_norm"):
            _expect(shapes, b + f"norm.{name}.scale", (head_dim,), f"RMSNorm per {head_dim}-wide head, as in block 0")
        _linear(shapes, f"single_controlnet_blocks.{i}{out}", hidden, hidden, "the model's width")

    return _build(layout=layout, hidden_size=hidden, head_dim=head_dim, num_layers=depth, num_single_layers=single,
                  in_channels=in_ch, hint_channels=HINT_ENCODER_CHANNELS * PATCH * PATCH, pooled_projection_dim=pooled,
                  joint_attention_dim=joint, mlp_hidden_dim=mlp, guidance_embeds=guidance, qkv_bias=qkv_bias)


def config_from_shapes(shapes: Shapes) -> FluxControlNetConfig:
    """The `FluxControlNetConfig` the tensor shapes describe (`shapes`: key -> shape, e.g. from a file's header),
    whichever of the three layouts they are in.

    Raises `CheckpointError` naming the first key whose shape does not fit the others, or when the keys are no Flux
    ControlNet's.
    """
    layout = flux_layout(shapes)
    if layout is None:
        raise CheckpointError("the keys are not those of a Flux ControlNet (InstantX, XLabs or MistoLine layout).")
    return _instantx_config(shapes) if layout == "instantx" else _bfl_config(shapes, layout)


log = logging.getLogger(__name__)


def _compute_dtype(source: TensorSource, options: LoadOptions) -> torch.dtype:
    stored = next((source.stored_dtype(k) for k in source.keys() if source.stored_dtype(k).is_floating_point), torch.float32)
    return compute_dtype(stored, options.dtype)


def load(source: TensorSource, options: LoadOptions) -> LoadedControl:
    """Any of the three layouts: the keys are our parameter names. fp8 tensors are cast one by one on reading, into
    the compute dtype, or stay fp8 with `keep_fp8`; nothing is written back."""
    from ..flux import build_flux_controlnet

    keys = list(source.keys())
    config = config_from_shapes({k: source.shape(k) for k in keys})
    name = _FORMAT_OF_LAYOUT[config.layout]
    dtype = _compute_dtype(source, options)
    with torch.device("meta"):
        model = build_flux_controlnet(config, dtype=dtype)
    read = float_reader(model, source, dtype, options.keep_fp8)
    strict_fill(model, lambda k: read(k, k), set(keys), source.name, name)
    finish_load(model, options, dtype)
    log.info("loaded %s as '%s': %s", source.name, name, config.summary())
    return LoadedControl(model, name, source.name)


def save(model, path: Path, dtype: Optional[torch.dtype], overwrite: bool) -> Path:
    """The file's own layout: the model's state dict as it is (its keys are the layout's)."""
    return save_state_dict(model, path, dtype, overwrite)


_FLUX_DTYPES = ("bfloat16", "float16", "float32")  # ComfyUI's order for Flux
FORMATS = (
    Format("flux-instantx", "Flux ControlNet, diffusers layout (InstantX, Shakker union / Union Pro 2.0, alimama inpainting)",
           SIGNATURE_INSTANTX, is_flux_instantx, load, save, kind="flux_controlnet", takes_latent_hint=True,
           inference_dtypes=_FLUX_DTYPES),
    Format("flux-xlabs", "Flux ControlNet, XLabs layout (pixel hint encoder, double blocks)", SIGNATURE_XLABS, is_flux_xlabs, load, save,
           kind="flux_controlnet", inference_dtypes=_FLUX_DTYPES),
    Format("flux-mistoline", "Flux ControlNet, MistoLine layout", SIGNATURE_MISTOLINE, is_flux_mistoline, load, save, kind="flux_controlnet",
           inference_dtypes=_FLUX_DTYPES),
)
_FORMAT_OF_LAYOUT = {"instantx": "flux-instantx", "xlabs": "flux-xlabs", "mistoline": "flux-mistoline"}
