"""fp8 files held in fp8 (`load_control(..., keep_fp8=True)`, see controlnet_core/precision.py): the large layers stay
float8_e4m3fn in memory and cast where used, the outputs equal those of the same file upcast on load, the file's
layout survives export, non-finite fp8 values are refused, and a dtype chooser sees the family's record."""
import pytest
import torch
from factories import save
from safetensors.torch import load_file
from test_flux_control import diffusers_flux, flux_inputs
from test_qwen_control import diffusers_qwen, qwen_inputs

from controlnet_core import load_control, save_native
from controlnet_core.errors import NonFiniteWeightsError
from controlnet_core.loading import count_non_finite
from controlnet_core.precision import FP8, CastOnUseLinear

FP8_DTYPE = torch.float8_e4m3fn


def fp8_file(path, model) -> str:
    return save(path, {k: v.to(FP8_DTYPE) for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    return {"flux": fp8_file(d / "flux_union_fp8.safetensors", diffusers_flux("union", seed=2)),
            "qwen": fp8_file(d / "qwen_fp8.safetensors", diffusers_qwen("plain", seed=2))}


def run(family: str, loaded, dtype):
    model = loaded.model
    if family == "flux":
        x, hint, t, ctx, y, guidance = flux_inputs(model.config, 1)
        out = model(x.to(dtype), hint.to(dtype), t, ctx.to(dtype), y.to(dtype), guidance, control_mode=1)
        return out.double + out.single
    x, hint, t, ctx = qwen_inputs(model.config, 1)
    return model(x.to(dtype), hint.to(dtype), t, ctx.to(dtype)).blocks


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("family", ["flux", "qwen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_fp8_equals_the_upcast_model(files, family, dtype):
    kept = load_control(files[family], dtype=dtype, keep_fp8=True)
    upcast = load_control(files[family], dtype=dtype)
    linears = [m for m in kept.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is CastOnUseLinear and m.weight.dtype == FP8_DTYPE for m in linears)
    assert all(p.dtype == dtype for p in upcast.model.parameters())
    assert param_bytes(kept.model) < {torch.float32: 0.35, torch.bfloat16: 0.6}[dtype] * param_bytes(upcast.model)  # 1 byte a weight, not 4 or 2
    assert kept.model.compute_dtype == dtype
    with torch.no_grad():
        a, b = run(family, kept, dtype), run(family, upcast, dtype)
    assert len(a) == len(b) and all(x.dtype == dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_kept_fp8_saves_back_in_the_files_layout_and_dtype(files, family, tmp_path):
    kept = load_control(files[family], dtype=torch.float32, keep_fp8=True)
    out = save_native(kept, tmp_path / "again.safetensors")
    original, again = load_file(str(files[family])), load_file(str(out))
    assert set(again) == set(original)
    linear_keys = {k for k, v in again.items() if v.dtype == FP8_DTYPE}
    assert linear_keys and all(torch.equal(again[k].view(torch.uint8), original[k].view(torch.uint8)) for k in linear_keys)


def test_non_finite_fp8_values_are_counted_from_their_bits_and_refused(files, tmp_path):
    values = torch.tensor([1.0, float("nan"), -2.0, float("nan"), 0.5])
    assert count_non_finite(values.to(FP8_DTYPE)) == 2
    assert count_non_finite(torch.tensor([1.0, float("inf"), -float("inf"), float("nan")]).to(torch.float8_e5m2)) == 3
    assert count_non_finite(torch.tensor([448.0, -448.0, 0.0]).to(FP8_DTYPE)) == 0
    sd = load_file(str(files["flux"]))
    key = next(k for k, v in sd.items() if k.endswith("to_q.weight"))
    broken = sd[key].clone()
    broken.view(-1)[:3] = float("nan")
    sd[key] = broken
    path = save(tmp_path / "nan_fp8.safetensors", sd)
    for keep in (True, False):
        with pytest.raises(NonFiniteWeightsError, match=rf"nan_fp8.safetensors.*3 NaN/inf values.*{key}"):
            load_control(path, keep_fp8=keep)


def test_a_dtype_chooser_gets_the_family_record_and_the_files_main_dtype(files):
    seen = []

    def choose(fmt, stored):
        seen.append((fmt.name, fmt.inference_dtypes[0], stored))
        return torch.float32

    loaded = load_control(files["qwen"], dtype=choose, keep_fp8=True)
    assert seen == [("qwen-instantx", "bfloat16", FP8_DTYPE)] and loaded.model.compute_dtype == torch.float32
    assert {p.dtype for p in loaded.model.parameters()} <= FP8 | {torch.float32}


def test_without_keep_fp8_files_compute_in_bfloat16_by_default(files):
    loaded = load_control(files["flux"])
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
