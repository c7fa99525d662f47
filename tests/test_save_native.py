"""`save_native`: every family written back in the layout it was loaded from (a round trip keeps the format, every
key and every value); read-only layouts and existing outputs are refused with a clear message."""
import pytest
import torch
from comfy_flux import instantx_file
from factories import random_controlnet, save
from host import tiny_sd3_controlnet, tiny_sd35_controlnet
from safetensors.torch import load_file

from controlnet_core import ControlNetConfig, ControlNetError, OutputPathError, load_control, save_diffusers, save_native
from controlnet_core.formats import REGISTRY

TINY = ControlNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(0, 1), context_dim=64)


def _files(folder):
    sd = random_controlnet(TINY, seed=4).state_dict()
    out = {
        "ldm-v1.1": save(folder / "v11.safetensors", {"control_model." + k: v for k, v in sd.items()}),
        "ldm": save(folder / "bare.safetensors", sd),
        "sd3-diffusers": tiny_sd3_controlnet(folder / "sd3.safetensors", width=128, blocks=2),
        "sd35-stability": tiny_sd35_controlnet(folder / "sd35.safetensors", 2),
        "flux-instantx": instantx_file(folder / "flux.safetensors", modes=4),
    }
    out["diffusers"] = save_diffusers(load_control(out["ldm"]), folder / "diffusers")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("native"))


def _state(lc):
    return {k: v for k, v in lc.model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["ldm-v1.1", "ldm", "diffusers", "sd3-diffusers", "sd35-stability", "flux-instantx"])
def test_round_trip_keeps_format_keys_and_values(files, tmp_path, fmt):
    first = load_control(files[fmt])
    assert first.format == fmt
    out = save_native(first, tmp_path / ("copy" if fmt == "diffusers" else "copy.safetensors"))
    again = load_control(out)
    assert again.format == fmt and again.config == first.config
    a, b = _state(first), _state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if fmt != "diffusers":  # the very keys of the original file, nothing added or lost
        assert load_file(str(out)).keys() == load_file(str(files[fmt])).keys()


def test_existing_output_is_refused_unless_asked(files, tmp_path):
    lc = load_control(files["sd3-diffusers"])
    target = tmp_path / "taken.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputPathError):
        save_native(lc, target)
    assert target.read_bytes() == b"keep me"
    save_native(lc, target, overwrite=True)
    assert load_control(target).format == "sd3-diffusers"


def test_read_only_layouts_say_what_to_use_instead(files, tmp_path):
    lc = load_control(files["ldm"])
    lc.format = "diff"
    with pytest.raises(ControlNetError, match="read only.*save_ldm"):
        save_native(lc, tmp_path / "x.safetensors")


def test_every_format_is_a_complete_record():
    names = [f.name for f in REGISTRY]
    assert len(names) == len(set(names))
    for f in REGISTRY:
        assert f.description and callable(f.detect) and callable(f.load), f.name
        assert not f.takes_latent_hint or f.kind != "controlnet", f.name  # latent hints are for DiT kinds only
