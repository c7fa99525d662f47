"""Full-width Flux ControlNets (3072 = 24 heads of 128) through ComfyUI's own loader, once per layout. SLOW-ish module.

ComfyUI's `load_controlnet` recognises a Flux ControlNet only at Flux.1's full width (its detection fixes 24 heads of
128), so the rest of the suite builds its class directly at a tiny width (tests/test_flux_control.py). Here the host's
loader itself reads the files: random weights, the fewest blocks that show each layout (InstantX: 1 double + 1
single block, 0.55 G parameters; XLabs: 1 double block, 0.39 G), one forward each on a 16 x 16 latent (64 image
tokens) and 8 text tokens, and the host's control dict ("input" for its 19 double blocks, "output" for its 38 single
blocks) must equal our `FluxControlOutput.host_control()` at fp32, rel. err <= 1e-5 per entry (measured: 3e-7).

Cost, on 2 CPU cores: 34 s (about 50 s while other jobs share the cores) and 4.2 GB of resident memory at the peak
(one fp32 model at a time); the tests are named `..._once`, like the full-size SDXL ProMax test in test_union.py.
The files store bfloat16 (half the disk and writing time of fp32); both loaders are asked for float32, so both compute
in float32 from the very same (bf16-representable) weights and the fp32 tolerance applies. One more file stores
float8_e4m3fn, as fp8 Flux ControlNets are shipped: `load_control` reads it into bfloat16 by default, every weight
equal to the stored fp8 value cast.
"""
import gc
import logging

import pytest
import torch
from factories import rel_err
from fullsize_flux import convert_file, full_width_config, write_random_file

from controlnet_core import load_control
from controlnet_core.flux import COMFY_DOUBLE_SLOTS, COMFY_SINGLE_SLOTS

TOL = 1e-5
LATENT, TEXT_TOKENS = 16, 8  # a 16 x 16 latent: 8 x 8 = 64 tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """layout -> a full-width random-weight file (bf16 storage)."""
    d = tmp_path_factory.mktemp("flux_fullsize")
    return {
        "instantx": write_random_file(d / "flux_instantx_full_1d1s.safetensors", full_width_config("instantx", 1, 1), torch.bfloat16, seed=41),
        "xlabs": write_random_file(d / "flux_xlabs_full_1d.safetensors", full_width_config("xlabs", 1), torch.bfloat16, seed=42),
    }


def _inputs(pixel_hint: bool):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, LATENT, LATENT, generator=g)
    hint = torch.rand(1, 3, 8 * LATENT, 8 * LATENT, generator=g) if pixel_hint else torch.randn(1, 16, LATENT, LATENT, generator=g)
    t = torch.tensor([0.7])
    ctx = torch.randn(1, TEXT_TOKENS, 4096, generator=g)
    y = torch.randn(1, 768, generator=g)
    guidance = torch.tensor([3.5])
    return x, hint, t, ctx, y, guidance


@pytest.mark.parametrize("layout", ["instantx", "xlabs"])
def test_full_width_file_matches_comfyui_builtin_loader_once(comfy, files, caplog, layout):
    import comfy.controlnet

    path = files[layout]
    x, hint, t, ctx, y, guidance = _inputs(pixel_hint=layout == "xlabs")

    # 1. ComfyUI's own loader, from the file, in float32; every weight found (it only warns about missing keys)
    with caplog.at_level(logging.WARNING):
        theirs = comfy.controlnet.load_controlnet(str(path), model_options={"dtype": torch.float32})
    assert not [r for r in caplog.records if "missing" in r.getMessage()], caplog.text
    net = theirs.control_model.eval()
    assert type(net).__name__ == "ControlNetFlux" and net.params.hidden_size == 3072 and net.params.num_heads == 24
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    with torch.no_grad():
        out = net(x=x, timesteps=t, context=ctx, y=y, guidance=guidance, hint=hint, control_type=[])
    expected = {"input": list(out["input"]), "output": list(out.get("output") or [])}
    del out, net, theirs
    gc.collect()

    # 2. ours, from the same file, in float32
    ours = load_control(path, dtype=torch.float32)
    assert (ours.format, ours.kind) == (f"flux-{layout}", "flux_controlnet")
    cfg = ours.config
    assert (cfg.layout, cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.num_single_layers) == (
        layout, 3072, 24, 1, 1 if layout == "instantx" else 0)
    with torch.no_grad():
        mine = ours.model.eval()(x, hint, t, ctx, y, guidance).host_control()
    del ours
    gc.collect()

    assert len(mine["input"]) == len(expected["input"]) == COMFY_DOUBLE_SLOTS
    assert len(mine["output"]) == len(expected["output"]) == (COMFY_SINGLE_SLOTS if layout == "instantx" else 0)
    for site in ("input", "output"):
        for k, (a, b) in enumerate(zip(mine[site], expected[site])):
            assert a.shape == b.shape == (1, (LATENT // 2) ** 2, 3072), f"{site}[{k}]: {tuple(a.shape)} vs {tuple(b.shape)}"
            assert rel_err(a, b) <= TOL, f"{site}[{k}]: rel err {rel_err(a, b):.2e}"
    del mine, expected
    gc.collect()


def test_full_width_fp8_file_loads_in_bfloat16_once(files, tmp_path):
    """float8_e4m3fn storage: computed in bfloat16 unless asked otherwise; each weight is the fp8 value cast. Kept in
    fp8 (keep_fp8), the same outputs."""
    from safetensors import safe_open

    path = convert_file(files["instantx"], tmp_path / "flux_instantx_full_1d1s_fp8.safetensors", torch.float8_e4m3fn)
    ours = load_control(path)
    params = dict(ours.model.state_dict())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(params)
        for k in f.keys():
            stored = f.get_tensor(k)
            assert stored.dtype == torch.float8_e4m3fn, k
            assert torch.equal(params[k], stored.to(torch.bfloat16)), k
    x, hint, t, ctx, y, guidance = _inputs(pixel_hint=False)
    with torch.no_grad():
        out = ours.model.eval()(x.bfloat16(), hint.bfloat16(), t, ctx.bfloat16(), y.bfloat16(), guidance)
    assert all(o.dtype == torch.bfloat16 and bool(torch.isfinite(o).all()) for o in out.double + out.single)
    del params, ours
    gc.collect()
    # held as ComfyUI holds it (keep_fp8, what the loader node asks): 1 byte a weight in memory, the same outputs
    kept = load_control(path, dtype=torch.bfloat16, keep_fp8=True)
    fp8 = sum(p.numel() for p in kept.model.parameters() if p.dtype == torch.float8_e4m3fn)
    assert fp8 > 0.99 * sum(p.numel() for p in kept.model.parameters())
    with torch.no_grad():
        again = kept.model(x.bfloat16(), hint.bfloat16(), t, ctx.bfloat16(), y.bfloat16(), guidance)
    assert all(torch.equal(a, b) for a, b in zip(out.double + out.single, again.double + again.single))
    del kept, out, again
    gc.collect()
