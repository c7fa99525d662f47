"""A corpus of malformed weight files, each made by the tests themselves from a small valid ControlNet.

Every maker writes real bytes under a folder and returns the path to hand to `load_control` (a file, or a folder
for the folder cases). Shared by the corpus test (one named case each) and the fuzz test (random mutations of the
same headers).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Optional

import torch
from factories import random_controlnet
from safetensors.torch import save_file

from controlnet_core import ControlNetConfig, save_diffusers
from controlnet_core.loader import METADATA_CONFIG, METADATA_GAP

# Smaller than SD15_TINY: one level, no attention, so a fuzz example loads in milliseconds
MINI = ControlNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=(1,), transformer_depth=(0,), transformer_depth_middle=-1,
                        context_dim=None, hint_block_channels=(16, 16, 16, 16))
# Two levels of two ResBlocks and attention, so a removed block or head counts mean something
TWO_LEVELS = ControlNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(2, 2), transformer_depth=(1, 1), context_dim=32,
                              num_heads=4, hint_block_channels=(16, 16, 16, 16))
LAST_BLOCK = ("input_blocks.5.", "zero_convs.5.")  # TWO_LEVELS' last ResBlock and its zero conv
LAST_BLOCK_DIFFUSERS = ("down_blocks.1.resnets.1.", "down_blocks.1.attentions.1.", "controlnet_down_blocks.5.")


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A .safetensors file from a header (any JSON value) and the data bytes, with no validation at all."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def state_dict(cfg: ControlNetConfig = MINI) -> dict[str, torch.Tensor]:
    return random_controlnet(cfg).state_dict()


def good_file(path: Path, cfg: ControlNetConfig = MINI, metadata: Optional[dict] = None) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict(cfg).items()}, str(path), metadata=metadata)
    return path


def our_export(path: Path, cfg: ControlNetConfig = MINI) -> Path:
    """As `save_ldm` writes it: control_model.* keys plus our config metadata."""
    sd = {"control_model." + k: v for k, v in state_dict(cfg).items()}
    save_file(sd, str(path), metadata={"format": "pt", METADATA_CONFIG: cfg.to_json(), METADATA_GAP: "false"})
    return path


def mutate(path: Path, change: Callable[[dict], object], data_change: Optional[Callable[[bytes], bytes]] = None) -> Path:
    """Rewrite a file's header through `change(header)` (which edits in place or returns a replacement)."""
    header, data = read_raw(path)
    out = change(header)
    return write_raw(path, header if out is None else out, data_change(data) if data_change else data)


def _entry(header: dict, key: str = "input_blocks.0.0.weight") -> dict:
    return header[key]


def _with_config(path: Path, value: str, cfg: ControlNetConfig = MINI) -> Path:
    our_export(path, cfg)
    return mutate(path, lambda h: h["__metadata__"].__setitem__(METADATA_CONFIG, value))


def _config_field(path: Path, **fields) -> Path:
    data = json.loads(MINI.to_json())
    data.update(fields)
    return _with_config(path, json.dumps(data))


def _shift(path: Path, start_delta: int, end_delta: int) -> Path:
    def change(h):
        start, end = _entry(h)["data_offsets"]
        _entry(h)["data_offsets"] = [start + start_delta, end + end_delta]
    return mutate(good_file(path), change)


def _negative_offsets(path: Path) -> Path:
    def change(h):
        e = _entry(h)
        n = e["data_offsets"][1] - e["data_offsets"][0]
        e["data_offsets"] = [-n, 0]  # would read the JSON header's own bytes as weights
    return mutate(good_file(path), change)


def _overlapping(path: Path) -> Path:
    def change(h):
        keys = [k for k in h if k != "__metadata__"]
        a, b = h[keys[0]], h[keys[1]]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + (b["data_offsets"][1] - b["data_offsets"][0])]
    return mutate(good_file(path), change)


def _shape(path: Path, shape) -> Path:
    return mutate(good_file(path), lambda h: _entry(h).__setitem__("shape", shape))


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_header(path: Path) -> Path:
    header, data = read_raw(good_file(path))
    text = json.dumps(header)[:-1] + ', "__metadata__": {"x": ' + _deep(100_000) + "}}"
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _dtype_everywhere(path: Path, dtype: torch.dtype) -> Path:
    sd = {k: (v * 100).to(dtype) for k, v in state_dict().items()}
    save_file(sd, str(path))
    return path


def _conv_weight(path: Path, shape: tuple[int, ...]) -> Path:
    sd = state_dict()
    sd["input_blocks.0.0.weight"] = torch.zeros(shape)
    save_file(sd, str(path))
    return path


def _diffusers_folder(folder: Path, config_change: Callable[[dict], object], drop: tuple[str, ...] = ()) -> Path:
    """A diffusers export of TWO_LEVELS, its config.json edited by `config_change`, tensors under `drop` removed."""
    save_diffusers(random_controlnet(TWO_LEVELS), folder)
    cfg_path, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    data = json.loads(cfg_path.read_text())
    out = config_change(data)
    cfg_path.write_text(json.dumps(data if out is None else out))
    if drop:
        from safetensors.torch import load_file

        save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith(drop)}, str(weights))
    return weights


def _block_removed(path: Path) -> Path:
    """Our export of TWO_LEVELS without its last ResBlock: the shapes alone describe a valid, smaller model."""
    sd = {"control_model." + k: v for k, v in state_dict(TWO_LEVELS).items() if not k.startswith(LAST_BLOCK)}
    save_file(sd, str(path), metadata={"format": "pt", METADATA_CONFIG: TWO_LEVELS.to_json()})
    return path


def _extra_key(path: Path, key: str, value: torch.Tensor) -> Path:
    save_file({**state_dict(), key: value}, str(path))
    return path


def _pooling_flag(path: Path, value: str) -> Path:
    return mutate(our_export(path), lambda h: h["__metadata__"].__setitem__(METADATA_GAP, value))


def _non_finite(path: Path) -> Path:
    sd = state_dict()
    sd["input_blocks.1.0.in_layers.2.weight"][0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    sd["zero_convs.0.0.weight"][0, 0] = float("-inf")
    save_file(sd, str(path))
    return path


def _plain_folder(path: Path) -> Path:
    folder = path.with_suffix("")
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    return folder


class RunsCode:
    """Unpickling this calls os.system: the kind of object a weights-only load must refuse."""

    def __reduce__(self):
        return (os.system, ("echo this would have run",))


def _pickle_with_code(path: Path) -> Path:
    path = path.with_suffix(".ckpt")
    torch.save({"state_dict": state_dict(), "callback": RunsCode()}, path)
    return path


# name -> (maker(path) -> path to load, text the message must contain)
CORPUS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "negative offsets": (_negative_offsets, "corrupt"),
    "overlapping offsets": (_overlapping, "corrupt"),
    "offset past the end": (lambda p: _shift(p, 0, 4), "corrupt"),
    "shape does not fit its bytes": (lambda p: _shape(p, [32, 4, 3, 4]), "corrupt"),
    "negative dimension": (lambda p: _shape(p, [-32, 4, 3, 3]), "corrupt"),
    "huge dimensions": (lambda p: _shape(p, [2**40, 2**40, 3, 3]), "corrupt"),
    "float offsets": (lambda p: mutate(good_file(p), lambda h: _entry(h).__setitem__("data_offsets", [0.0, 8.5])), "corrupt"),
    "unknown dtype": (lambda p: mutate(good_file(p), lambda h: _entry(h).__setitem__("dtype", "F12")), "corrupt"),
    "deeply nested header": (_deep_header, "corrupt"),
    "metadata not a dict": (lambda p: mutate(good_file(p), lambda h: h.__setitem__("__metadata__", ["a", "b"])), "corrupt"),
    "metadata not strings": (lambda p: mutate(good_file(p), lambda h: h.__setitem__("__metadata__", {"n": 3})), "corrupt"),
    "config metadata not JSON": (lambda p: _with_config(p, "{model_channels: 32"), METADATA_CONFIG),
    "config metadata deeply nested": (lambda p: _with_config(p, _deep(100_000)), METADATA_CONFIG),
    "config metadata a list": (lambda p: _with_config(p, "[1, 2]"), "JSON object"),
    "config zero heads": (lambda p: _config_field(p, num_heads=0, num_head_channels=-1), "num_heads"),
    "config string width": (lambda p: _config_field(p, model_channels="32"), "model_channels"),
    "config null levels": (lambda p: _config_field(p, channel_mult=None), "channel_mult"),
    "config says more levels": (lambda p: _config_field(p, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[0, 0]), "disagree"),
    "pooling flag not a bool": (lambda p: _pooling_flag(p, "maybe"), METADATA_GAP),
    "integer tensors": (lambda p: _dtype_everywhere(p, torch.int32), "floating point"),
    "bool tensors": (lambda p: _dtype_everywhere(p, torch.bool), "floating point"),
    "1-D conv weight": (lambda p: _conv_weight(p, (32 * 4 * 9,)), "input_blocks.0.0.weight"),
    "empty conv weight": (lambda p: _conv_weight(p, (0, 4, 3, 3)), "input_blocks.0.0.weight"),
    "huge block index": (lambda p: _extra_key(p, "input_blocks.1.1.transformer_blocks.99999999.norm1.weight", torch.ones(32)), "missing"),
    "a block removed (metadata says otherwise)": (_block_removed, "num_res_blocks (2, 2) (tensors: (2, 1))"),
    "non-finite weights": (_non_finite, "NaN/inf"),
    "pickle that runs code": (_pickle_with_code, "system"),
    "diffusers config a list": (lambda p: _diffusers_folder(p.with_suffix(""), lambda d: [d]), "JSON object"),
    "diffusers config zero heads": (lambda p: _diffusers_folder(p.with_suffix(""), lambda d: d.update(attention_head_dim=0)), "attention_head_dim"),
    "diffusers config string heads": (lambda p: _diffusers_folder(p.with_suffix(""), lambda d: d.update(attention_head_dim="4")), "attention_head_dim"),
    "diffusers block removed (config says otherwise)": (
        lambda p: _diffusers_folder(p.with_suffix(""), lambda d: None, drop=LAST_BLOCK_DIFFUSERS), "layers_per_block [2, 2] (tensors: [2, 1])"),
    "diffusers pooling flag not a bool": (lambda p: _diffusers_folder(p.with_suffix(""), lambda d: d.update(global_pool_conditions="maybe")),
                                          "global_pool_conditions"),
    "a folder that is no model": (_plain_folder, "expected"),
}
