"""Property-based fuzzing of header and metadata parsing (issue 12, item 4).

Whatever a file holds, `load_control` either loads it or raises a `ControlNetError` whose message names the file;
any other exception fails. Three levels: the raw header JSON and bytes (mostly the safetensors library's checks),
valid containers with damaged tensors and metadata (our derivation and config checks), and a diffusers config.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from corrupt_files import MINI, TWO_LEVELS, _diffusers_folder, our_export, read_raw, state_dict, write_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from controlnet_core import ControlNetConfig, ControlNetError, load_control
from controlnet_core.loader import METADATA_CONFIG, METADATA_GAP

# The same examples on every run (a CI failure can be replayed, and main does not turn red by chance);
# CNS_FUZZ_EXPLORE=1 draws new ones.
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=os.environ.get("CNS_FUZZ_EXPLORE") != "1")

json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=10)
numbers = st.sampled_from([0, 1, -1, 3, 32, 2**31, 2**63, 2**64]) | st.integers(-2**66, 2**66)
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "U64", "F12", ""]


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@pytest.fixture(scope="module")
def export(folder):
    """Our export of MINI (a path: hypothesis prints the arguments of a failing example)."""
    return our_export(folder / "base.safetensors")


def assert_contract(path: Path) -> None:
    try:
        load_control(path)
    except ControlNetError as e:
        assert str(path) in str(e), str(e)


# 1. the container: header entries, __metadata__ and bytes

entry_change = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(DTYPES) | json_value),
    st.tuples(st.just("shape"), st.lists(numbers, max_size=5) | json_value),
    st.tuples(st.just("data_offsets"), st.lists(numbers, max_size=3) | json_value),
    st.tuples(st.just("<delete>"), st.none()),
    st.tuples(st.just("<replace>"), json_value),
)


@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), entry_change), max_size=3), metadata=st.none() | json_value,
       cut=st.none() | st.integers(0, 400_000))
def test_fuzzed_container(folder, export, changes, metadata, cut):
    header, data = read_raw(export)
    keys = sorted(k for k in header if k != "__metadata__")
    for index, (field, value) in changes:
        key = keys[index % len(keys)]
        if field == "<delete>":
            header.pop(key, None)
        elif field == "<replace>":
            header[key] = value
        elif isinstance(header.get(key), dict):
            header[key][field] = value
    if metadata is not None:
        header["__metadata__"] = metadata
    path = write_raw(folder / "container.safetensors", header, data)
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    assert_contract(path)


# 2. valid containers, damaged content: shapes, dtypes, names, values, our metadata

KEY_PARTS = ["input_blocks", "middle_block", "zero_convs", "input_hint_block", "time_embed", "label_emb", "transformer_blocks",
             "middle_block_out", "task_embedding", "control_model", "0", "1", "2", "7", "99999999", "weight", "bias", "out_layers", "op"]
tensor_change = st.one_of(
    st.tuples(st.just("reshape"), st.sampled_from(["flat", "unsqueeze", "swap", "empty"])),
    st.tuples(st.just("dtype"), st.sampled_from([torch.int64, torch.int8, torch.bool, torch.float16, torch.bfloat16, torch.float64])),
    st.tuples(st.just("values"), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, 0.0])),
    st.tuples(st.just("rename"), st.lists(st.sampled_from(KEY_PARTS), min_size=1, max_size=6).map(".".join)),
    st.tuples(st.just("drop"), st.none()),
)
config_fields = [f.name for f in dataclasses.fields(ControlNetConfig)]


def _changed(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "flat":
        return t.flatten()
    if how == "unsqueeze":
        return t.unsqueeze(0)
    if how == "swap":
        return t.reshape(tuple(reversed(t.shape)))
    return t[:0]


@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), tensor_change), max_size=3),
       config=st.none() | st.text(max_size=30) | st.dictionaries(st.sampled_from(config_fields), json_value | numbers, max_size=3),
       gap=st.none() | st.sampled_from(["true", "false", "TRUE", " false", "", "yes", "0"]),
       prefix=st.booleans())
def test_fuzzed_content(folder, changes, config, gap, prefix):
    sd = state_dict(MINI)
    keys = sorted(sd)
    for index, (kind, arg) in changes:
        key = keys[index % len(keys)]
        if key not in sd:
            continue
        if kind == "reshape":
            sd[key] = _changed(sd[key], arg)
        elif kind == "dtype":
            sd[key] = sd[key].to(arg)
        elif kind == "values" and sd[key].is_floating_point():  # NaN and 1e30 exist only as floats
            sd[key] = sd[key].clone().flatten().index_fill(0, torch.tensor([0]), arg).reshape(sd[key].shape) if sd[key].numel() else sd[key]
        elif kind == "rename":
            sd[arg] = sd.pop(key)
        else:
            del sd[key]
    metadata = {"format": "pt"}
    if isinstance(config, str):
        metadata[METADATA_CONFIG] = config
    elif isinstance(config, dict):
        metadata[METADATA_CONFIG] = json.dumps({**json.loads(MINI.to_json()), **config})
    if gap is not None:
        metadata[METADATA_GAP] = gap
    path = folder / "content.safetensors"
    save_file({("control_model." if prefix else "") + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    assert_contract(path)


# 3. a diffusers config.json beside valid weights

DIFFUSERS_FIELDS = ["attention_head_dim", "num_attention_heads", "block_out_channels", "layers_per_block", "down_block_types", "in_channels",
                    "conditioning_channels", "cross_attention_dim", "global_pool_conditions", "conditioning_embedding_out_channels", "_class_name"]


@pytest.fixture(scope="module")
def diffusers(folder):
    """(weights file, its config.json as exported)."""
    weights = _diffusers_folder(folder / "diffusers", lambda d: None)
    return weights, json.loads((weights.parent / "config.json").read_text())


@settings(FUZZ, max_examples=100)
@given(fields=st.dictionaries(st.sampled_from(DIFFUSERS_FIELDS), json_value | numbers | st.lists(numbers, max_size=4), max_size=3),
       whole=st.none() | json_value, as_folder=st.booleans())
def test_fuzzed_diffusers_config(diffusers, fields, whole, as_folder):
    weights, base = diffusers
    (weights.parent / "config.json").write_text(json.dumps(whole if whole is not None else {**base, **fields}))
    assert_contract(weights.parent if as_folder else weights)


def test_the_fuzz_bases_load(folder, export):
    """The unmutated inputs load, so the properties above are about the mutations."""
    assert load_control(write_raw(folder / "plain.safetensors", *read_raw(export))).config == MINI
    assert load_control(_diffusers_folder(folder / "plain_diffusers", lambda d: None)).config == TWO_LEVELS
