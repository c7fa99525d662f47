"""Our modules carry the published checkpoints' exact key names and shapes (dumps in tests/data/keys)."""
from pathlib import Path

import pytest
import torch
from factories import SD15, SD21, SDXL

from controlnet_core import ControlNet, T2IAdapter, T2IAdapterConfig, config_from_unet_like_state_dict
from controlnet_core.formats import diffusers as dfmt
from controlnet_core.formats import t2i as t2i_fmt

KEYS = Path(__file__).parent / "data" / "keys"


def dump(name: str) -> dict[str, tuple]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        k, shape = line.split("\t")[:2]
        out[k] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def shapes_of(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg, name, n_params", [(SD15, "keys_cldm_sd15.tsv", 361_279_120), (SDXL, "keys_cldm_sdxl.tsv", 1_251_014_160)])
def test_ldm_keys_and_shapes_match_the_published_layout(cfg, name, n_params):
    with torch.device("meta"):
        model = ControlNet(cfg)
    assert shapes_of(model) == dump(name)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_sd21_differs_from_sd15_only_in_context_and_projections():
    """SD2.x: 1024-wide context and linear proj_in/proj_out; everything else as SD1.5."""
    with torch.device("meta"):
        sd15, sd21 = shapes_of(ControlNet(SD15)), shapes_of(ControlNet(SD21))
    assert sd15.keys() == sd21.keys()
    diff = {k for k in sd15 if sd15[k] != sd21[k]}
    assert diff and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight", "proj_in.weight", "proj_out.weight")) for k in diff)
    assert sd21["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert sd21["input_blocks.1.1.proj_in.weight"] == (320, 320)
    meta = {k: torch.empty(s, device="meta") for k, s in sd21.items()}
    assert config_from_unet_like_state_dict(meta) == SD21


@pytest.mark.parametrize("cfg, name", [(SD15, "keys_cldm_sd15.tsv"), (SDXL, "keys_cldm_sdxl.tsv")])
def test_config_is_derived_back_from_the_published_shapes(cfg, name):
    meta = {k: torch.empty(s, device="meta") for k, s in dump(name).items()}
    assert config_from_unet_like_state_dict(meta) == cfg


@pytest.mark.parametrize("cfg, ldm_name, diff_name", [(SD15, "keys_cldm_sd15.tsv", "keys_diffusers_sd15.tsv"), (SDXL, "keys_cldm_sdxl.tsv", "keys_diffusers_sdxl.tsv")])
def test_diffusers_key_table_matches_the_published_diffusers_layout(cfg, ldm_name, diff_name):
    ldm, diff = dump(ldm_name), dump(diff_name)
    to_diff = dfmt.from_canonical_map(cfg, ldm)
    assert {to_diff[k]: s for k, s in ldm.items()} == diff
    back = dfmt.canonical_map(diff)
    assert {c: diff[d] for c, d in back.items()} == ldm


@pytest.mark.parametrize("cfg, name", [
    (T2IAdapterConfig(cin=192), "keys_t2i_full_sd15_orig.tsv"),
    (T2IAdapterConfig(light=True, cin=192, nums_rb=4, ksize=3), "keys_t2i_light_sd15_orig.tsv"),
])
def test_t2i_keys_match_the_original_layout(cfg, name):
    with torch.device("meta"):
        model = T2IAdapter(cfg)
    assert shapes_of(model) == dump(name)


@pytest.mark.parametrize("cfg, name, light", [
    (T2IAdapterConfig(cin=192), "keys_t2i_full_sd15_diffusers.tsv", False),
    (T2IAdapterConfig(cin=768, xl=True), "keys_t2i_full_sdxl_diffusers.tsv", False),
    (T2IAdapterConfig(light=True, cin=192, nums_rb=4, ksize=3), "keys_t2i_light_diffusers_c3.tsv", True),
])
def test_t2i_diffusers_key_tables(cfg, name, light):
    with torch.device("meta"):
        model = T2IAdapter(cfg)
    ours = shapes_of(model)
    names = t2i_fmt.to_diffusers_map(ours, light)
    assert {names[k]: s for k, s in ours.items()} == dump(name)
    fmt = t2i_fmt.detect(set(dump(name)))
    back = t2i_fmt.canonical_map(dump(name), fmt)
    assert {c: dump(name)[d] for c, d in back.items()} == ours
