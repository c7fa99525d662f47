"""Every bad-input error is provoked with a real bad file on disk, and its message says what to do."""

import pytest
import torch
from factories import SD15_320, SD15_TINY, SDXL_TINY, comfy_unet, random_controlnet, save

from controlnet_core import (
    BaseModelInfo,
    ControlNetError,
    IncompatibleModelError,
    NotACheckpointError,
    UnknownLayoutError,
    UnsafeCheckpointError,
    check_compatible,
    load_control,
)


@pytest.fixture
def good(tmp_path):
    return save(tmp_path / "good.safetensors", random_controlnet(SD15_TINY).state_dict())


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(NotACheckpointError, match="empty"):
        load_control(p)


def test_html_page(tmp_path):
    p = tmp_path / "control_v11p_sd15_canny.pth"
    p.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>")
    with pytest.raises(NotACheckpointError, match="HTML") as e:
        load_control(p)
    assert str(p) in str(e.value) and "download" in str(e.value).lower()


def test_git_lfs_pointer(tmp_path):
    p = tmp_path / "control.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4c2ba3e6f1a0\nsize 1445157120\n")
    with pytest.raises(NotACheckpointError, match="git lfs pull"):
        load_control(p)


def test_truncated_safetensors(tmp_path, good):
    data = good.read_bytes()
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(NotACheckpointError, match="truncated"):
        load_control(p)


def test_corrupt_safetensors_header(tmp_path, good):
    data = bytearray(good.read_bytes())
    data[10:20] = b"\xff" * 10
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(bytes(data))
    with pytest.raises(NotACheckpointError, match="corrupt"):
        load_control(p)


def test_truncated_pth(tmp_path):
    p = tmp_path / "cn.pth"
    torch.save({"control_model." + k: v for k, v in random_controlnet(SD15_TINY).state_dict().items()}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(NotACheckpointError, match="corrupt or truncated"):
        load_control(p)


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.bin"
    p.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(NotACheckpointError, match="not a recognised weight file"):
        load_control(p)


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_with_code_is_refused(tmp_path, legacy, capsys):
    p = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"zero_convs.0.0.weight": torch.zeros(1)}, "hook": Payload()}
    if legacy:
        torch.save(obj, p, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, p)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_control(p)
    assert "this would have run" not in capsys.readouterr().out


def test_unknown_layout_names_the_closest(tmp_path):
    sd = {"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}  # diffusers-like, then garbage
    p = save(tmp_path / "odd.safetensors", {"foo.bar.weight": torch.zeros(2), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)})
    with pytest.raises(UnknownLayoutError, match="Closest known layout: 'ldm'"):
        load_control(p)
    del sd


def test_known_layout_with_missing_keys(tmp_path):
    sd = random_controlnet(SD15_TINY).state_dict()
    del sd["zero_convs.2.0.weight"]
    with pytest.raises(ControlNetError, match=r"Missing 1: \['zero_convs.2.0.weight'\]"):
        load_control(save(tmp_path / "m.safetensors", sd))


def test_nonexistent_file(tmp_path):
    with pytest.raises(NotACheckpointError, match="no such file"):
        load_control(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cn_cfg, unet_cfg, needle", [
    (SDXL_TINY, SD15_TINY, "label_emb"),
    (SD15_320, SDXL_TINY, "cross-attention width 768 vs 64"),
])
def test_family_mismatch_is_caught_before_sampling(comfy, tmp_path, cn_cfg, unet_cfg, needle):
    lc = load_control(save(tmp_path / "cn.safetensors", random_controlnet(cn_cfg).state_dict()))
    base = BaseModelInfo.from_unet(comfy_unet(unet_cfg).state_dict(), name="tiny.safetensors")
    with pytest.raises(IncompatibleModelError, match=needle) as e:
        check_compatible(lc.config, base, control_name="cn.safetensors")
    assert "cn.safetensors" in str(e.value) and "tiny.safetensors" in str(e.value)
    check_compatible(lc.config, BaseModelInfo.from_unet(comfy_unet(cn_cfg).state_dict()))  # the right family passes


def test_hint_of_wrong_size_or_channels_is_a_clear_error():
    model = random_controlnet(SD15_TINY)
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64), torch.tensor([1.0])
    with pytest.raises(ControlNetError, match="resize the hint to 8x the latent size"):
        model(x, torch.rand(1, 3, 32, 32), t, ctx)
    with pytest.raises(ControlNetError, match="expected \\(batch, 3"):
        model(x, torch.rand(1, 4, 64, 64), t, ctx)
    with pytest.raises(ControlNetError, match="does not divide"):
        model(torch.randn(3, 4, 8, 8), torch.rand(2, 3, 64, 64), torch.ones(3), torch.randn(3, 3, 64))
