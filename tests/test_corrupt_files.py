"""One error contract for malformed files (issue 12, item 4): a `ControlNetError` subclass naming the file and the
problem, from the library and as one `error:` line with exit code 2 from the CLI; nothing half-written left behind."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corrupt_files import CORPUS, MINI, TWO_LEVELS, _diffusers_folder, good_file, mutate, our_export, state_dict
from factories import CONTROL_ONLY, control_lora_state, random_controlnet

from controlnet_core import (
    CheckpointError,
    ControlNetError,
    NonFiniteWeightsError,
    NotACheckpointError,
    OutputPathError,
    UnsafeCheckpointError,
    load_control,
    save_diffusers,
    save_ldm,
)
from controlnet_core.__main__ import main
from controlnet_core.checkpoint import SafetensorsSource, save_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _parts(folder: Path) -> list[Path]:
    return list(folder.rglob("*.part"))


@pytest.mark.parametrize("name", list(CORPUS))
def test_library_raises_a_controlnet_error_naming_the_file(tmp_path, name, capfd):
    make, needle = CORPUS[name]
    path = make(tmp_path / "case.safetensors")
    with pytest.raises(ControlNetError) as e:
        load_control(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg, msg
    assert "\n" not in msg and "\x1b" not in msg and "weights_only" not in msg, msg
    assert "this would have run" not in capfd.readouterr().out


@pytest.mark.parametrize("name", list(CORPUS))
def test_cli_prints_one_error_line_and_exits_2(tmp_path, name, capsys):
    make, _ = CORPUS[name]
    path = make(tmp_path / "case.safetensors")
    assert main(["info", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], out.err


def test_cli_in_a_real_process(tmp_path):
    for name in ("negative offsets", "config zero heads", "integer tensors", "diffusers config a list"):
        path = CORPUS[name][0](tmp_path / f"{name.replace(' ', '_')}.safetensors")
        r = subprocess.run([sys.executable, "-m", "controlnet_core", "info", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = r.stderr.splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_non_finite_weights_name_the_tensors_and_counts(tmp_path):
    path = CORPUS["non-finite weights"][0](tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteWeightsError) as e:
        load_control(path, dtype=torch.float32)
    msg = str(e.value)
    assert "3 NaN/inf values in 2 of" in msg
    assert "input_blocks.1.0.in_layers.2.weight: 2" in msg and "zero_convs.0.0.weight: 1" in msg
    with pytest.raises(NonFiniteWeightsError):  # the same in any stored and compute dtype
        load_control(save_fp16(path), dtype=torch.bfloat16)


def save_fp16(path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    out = path.with_name("nan_fp16.safetensors")
    save_file({k: v.half() for k, v in load_file(str(path)).items()}, str(out))
    return out


def test_large_finite_weights_are_not_mistaken_for_inf(tmp_path):
    """The check sums each tensor first; a sum that overflows fp16 must fall back to the exact count."""
    sd = {k: v.half() for k, v in state_dict().items()}
    sd["input_blocks.1.0.in_layers.2.weight"] = torch.full_like(sd["input_blocks.1.0.in_layers.2.weight"], 60000.0)
    path = good_file(tmp_path / "big.safetensors")
    from safetensors.torch import save_file

    save_file(sd, str(path))
    assert torch.isinf(sd["input_blocks.1.0.in_layers.2.weight"].sum())
    load_control(path)


def test_refused_pickle_names_the_object_and_never_advises_disabling_protection(tmp_path, capfd):
    path = CORPUS["pickle that runs code"][0](tmp_path / "evil.safetensors")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_control(path)
    msg = str(e.value)
    assert f"'{os.system.__module__}.system'" in msg and "refused" in msg and ".safetensors" in msg
    assert "weights_only" not in msg and "\x1b" not in msg and "trust" not in msg
    assert "this would have run" not in capfd.readouterr().out


@pytest.mark.parametrize("stored, expected", [("false", False), ("False", False), ("true", True), (False, False), (True, True)])
def test_diffusers_pooling_flag_as_text_or_bool(tmp_path, stored, expected):
    weights = _diffusers_folder(tmp_path / "cn", lambda d: d.update(global_pool_conditions=stored))
    assert load_control(weights).config.global_average_pooling is expected


def test_a_diffusers_folder_loads_as_its_file(tmp_path):
    weights = _diffusers_folder(tmp_path / "cn", lambda d: None)
    a, b = load_control(weights), load_control(weights.parent)
    assert b.format == "diffusers" and a.config == b.config
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    (weights.parent / "config.json").unlink()
    with pytest.raises(NotACheckpointError, match="expected a ControlNet or T2I-Adapter file"):
        load_control(weights.parent)


def test_without_a_config_a_removed_block_is_a_smaller_model(tmp_path):
    """What the shapes alone cannot tell: the config or metadata is what makes the removed block an error."""
    from corrupt_files import LAST_BLOCK
    from safetensors.torch import save_file

    path = tmp_path / "smaller.safetensors"
    save_file({k: v for k, v in state_dict(TWO_LEVELS).items() if not k.startswith(LAST_BLOCK)}, str(path))
    assert load_control(path).config.num_res_blocks == (2, 1)
    with pytest.raises(CheckpointError, match="disagree"):
        load_control(CORPUS["a block removed (metadata says otherwise)"][0](tmp_path / "declared.safetensors"))


LORA_MINI = dataclasses.replace(MINI, hint_block_channels=(16, 32, 96, 256))  # a control-LoRA's hint widths are the standard ones


def control_lora(folder: Path, bad: str = "", dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """A rank-2 control-LoRA of LORA_MINI and its base UNet file, built like test_formats' control-LoRA (time_embed.2
    left unpatched); `bad` names one tensor of either file, written as `dtype`."""
    base = {k: v.clone() for k, v in random_controlnet(LORA_MINI, seed=11).state_dict().items() if not k.startswith(CONTROL_ONLY)}
    lora = control_lora_state(state_dict(LORA_MINI), rank=2, seed=5, unpatched=("time_embed.2.",))  # time_embed.2: the base's own weight
    for sd in (lora, base):
        if bad in sd:
            sd[bad] = (sd[bad] * 100).to(dtype)
    from safetensors.torch import save_file

    path, base_path = folder / "control-lora-mini.safetensors", folder / "base_unet.safetensors"
    save_file({k: v.contiguous() for k, v in lora.items()}, str(path))
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in base.items()}, str(base_path))
    return path, base_path


def test_control_lora_integer_or_bool_tensors_are_named(tmp_path):
    """Issue 12: a control-LoRA's stored weights, its up/down factors and the base weights it patches must be floating
    point; each other dtype is refused naming the file, the key, the dtype and what was expected."""
    path, base = control_lora(tmp_path)
    good = load_control(path, base_unet=base)  # the well-formed file loads
    assert good.format == "control-lora" and good.config == LORA_MINI
    cases = [("zero_convs.0.0.weight", torch.int32, "lora"), ("input_blocks.1.0.in_layers.2.up", torch.int64, "lora"),
             ("input_blocks.1.0.in_layers.2.down", torch.bool, "lora"), ("input_blocks.0.0.bias", torch.int16, "lora"),
             ("input_blocks.1.0.in_layers.2.weight", torch.int32, "base"), ("time_embed.2.weight", torch.bool, "base")]
    for key, dtype, where in cases:
        folder = tmp_path / f"{key}-{dtype}".replace("torch.", "")
        folder.mkdir()
        path, base = control_lora(folder, bad=key, dtype=dtype)
        with pytest.raises(CheckpointError) as e:
            load_control(path, base_unet=base)
        msg = str(e.value)
        stored_as = f"'{key}' is stored as {dtype}" if where == "lora" else f"{base}: 'model.diffusion_model.{key}' is stored as {dtype}"
        assert str(path) in msg and stored_as in msg and "must be floating point" in msg and "\n" not in msg, msg


def test_every_reader_gives_the_same_tensors_and_releases_the_file(tmp_path):
    """pread (newer safetensors) and the memory-map fallback (older): same values, and no tensor keeps the file mapped."""
    path = our_export(tmp_path / "cn.safetensors")
    by_pread, by_map = SafetensorsSource(path, pread=True), SafetensorsSource(path, pread=False)
    assert by_pread.keys() == by_map.keys() and by_pread.metadata == by_map.metadata
    tensors = [by_map.get(k) for k in by_map.keys()]
    for k, t in zip(by_map.keys(), tensors):
        assert torch.equal(t, by_pread.get(k)) and by_map.stored_dtype(k) == t.dtype
    assert by_map.get(by_map.keys()[0], torch.float16).dtype == torch.float16
    del by_pread, by_map
    if Path("/proc/self/maps").exists():
        assert str(path) not in Path("/proc/self/maps").read_text()


def test_save_failure_leaves_no_part_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputPathError, match="Permission denied"):
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_a_folder_or_an_existing_file(tmp_path, capsys):
    src = good_file(tmp_path / "cn.safetensors")
    folder = tmp_path / "existing"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(src), str(folder), *extra]) == 2
        assert "is a folder" in capsys.readouterr().err
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"keep me")
    assert main(["convert", str(src), str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(existing), "--overwrite"]) == 0
    assert load_control(existing).config == MINI
    (folder / "config.json").write_text("{}")
    assert main(["convert", str(src), str(folder), "--to", "diffusers"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(src), str(folder), "--to", "diffusers", "--overwrite"]) == 0
    assert load_control(folder).config == MINI
    assert main(["convert", str(src), str(existing), "--to", "diffusers", "--overwrite"]) == 2  # a file where a folder goes
    assert _parts(tmp_path) == []


def test_library_export_never_replaces_a_folder(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        save_ldm(random_controlnet(MINI), folder)
    assert _parts(tmp_path) == []


def test_library_export_refuses_an_existing_output_unless_asked(tmp_path, monkeypatch):
    """save_ldm / save_diffusers called from code: an existing file or a non-empty folder is kept unless
    overwrite=True, and a failed replacement leaves the old file and no `.part`."""
    model = random_controlnet(MINI)
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="already exists") as e:
        save_ldm(model, existing)
    assert str(existing) in str(e.value) and existing.read_bytes() == b"keep me"
    folder = tmp_path / "diffusers"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(OutputPathError, match="not empty") as e:
        save_diffusers(model, folder)
    assert str(folder) in str(e.value) and [p.name for p in folder.iterdir()] == ["config.json"]
    assert (folder / "config.json").read_text() == "{}"

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", refuse)
        with pytest.raises(OutputPathError, match="Permission denied"):
            save_ldm(model, existing, overwrite=True)
    assert existing.read_bytes() == b"keep me" and _parts(tmp_path) == []

    assert save_ldm(model, existing, overwrite=True) == existing
    assert load_control(existing).config == MINI
    assert save_diffusers(model, folder, overwrite=True) == folder
    assert load_control(folder).config == MINI
    assert _parts(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_control(save_diffusers(model, empty)).config == MINI  # an empty folder holds nothing to keep


@pytest.mark.parametrize("count", ["0", "-2"])
def test_create_with_no_hint_channels(tmp_path, capsys, count):
    base = good_file(tmp_path / "unet.safetensors")
    out = tmp_path / "new.safetensors"
    assert main(["create", str(base), str(out), "--hint-channels", count]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hint_channels" in lines[0]
    assert not out.exists() and _parts(tmp_path) == []


def test_metadata_of_our_own_export_still_loads(tmp_path):
    """The checks refuse damage, not our files: an export with its metadata and one edited only in harmless fields."""
    path = our_export(tmp_path / "ok.safetensors", TWO_LEVELS)
    assert load_control(path).config == TWO_LEVELS
    data = json.loads(TWO_LEVELS.to_json())
    data["a_field_of_a_newer_version"] = [1, 2]
    mutate(path, lambda h: h["__metadata__"].__setitem__("controlnet_core.config", json.dumps(data)))
    assert load_control(path).config == TWO_LEVELS
