"""Every supported layout is detected, loads to the same weights, and survives a round trip."""
import pytest
import torch
from factories import SD15_TINY, SDXL_TINY, comfy_unet, control_lora_state, inputs, random_controlnet, randomize_, save

from controlnet_core import (
    BaseModelRequiredError,
    load_control,
    save_diffusers,
    save_ldm,
)
from controlnet_core.formats import t2i as t2i_fmt
from controlnet_core.t2i_adapter import T2IAdapter, T2IAdapterConfig


def same_weights(a: torch.nn.Module, b: torch.nn.Module, *dtypes):
    """Bit-equal after passing a's weights through `dtypes` (e.g. stored, then compute)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        for d in dtypes:
            x = x.to(d)
        assert torch.equal(x.float(), y.float()), k


@pytest.fixture(params=[SD15_TINY, SDXL_TINY], ids=["sd15-shaped", "sdxl-shaped"])
def cfg(request):
    return request.param


def test_v10_full_checkpoint_reads_only_the_controlnet(tmp_path, cfg, monkeypatch):
    ref = random_controlnet(cfg)
    sd = {"control_model." + k: v for k, v in ref.state_dict().items()}
    sd.update({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(cfg.model_channels, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(10, 8),
               "betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000)})
    path = save(tmp_path / "control_sd15_canny.safetensors", sd)
    from controlnet_core.checkpoint import SafetensorsSource

    read = []
    orig = SafetensorsSource.get
    monkeypatch.setattr(SafetensorsSource, "get", lambda self, k, dtype=None: (read.append(k), orig(self, k, dtype))[1])
    lc = load_control(path)
    assert lc.format == "ldm-v1.0-full"
    assert all(k.startswith("control_model.") for k in read) and len(read) == len(ref.state_dict())
    same_weights(ref, lc.model)


def test_pth_v11_with_weights_only(tmp_path, cfg):
    ref = random_controlnet(cfg)
    path = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save({"control_model." + k: v for k, v in ref.state_dict().items()}, path)
    lc = load_control(path)
    assert lc.format == "ldm-v1.1"
    same_weights(ref, lc.model)


def test_state_dict_wrapper_in_ckpt(tmp_path):
    ref = random_controlnet(SD15_TINY)
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {"control_model." + k: v for k, v in ref.state_dict().items()}, "epoch": 3}, path)
    same_weights(ref, load_control(path).model)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_any_stored_dtype_any_compute_dtype(tmp_path, stored, compute):
    ref = random_controlnet(SD15_TINY)
    path = save(tmp_path / "cn.safetensors", {k: v.to(stored) for k, v in ref.state_dict().items()})
    lc = load_control(path, dtype=compute)
    assert all(p.dtype == compute for p in lc.model.parameters())
    same_weights(ref, lc.model, stored, compute)
    assert load_control(path).model.input_blocks[0][0].weight.dtype == stored  # default: keep the stored dtype
    x, hint, t, ctx, y = inputs(SD15_TINY, dtype=compute)
    with torch.no_grad():
        assert all(torch.isfinite(r).all() for r in lc.residuals(x, hint, t, ctx, y).tensors())


def test_ldm_round_trip_via_export(tmp_path, cfg):
    ref = random_controlnet(cfg)
    lc = load_control(save(tmp_path / "a.safetensors", ref.state_dict()))
    out = save_ldm(lc, tmp_path / "b.safetensors")
    back = load_control(out)
    assert back.format == "ldm-v1.1" and back.config == lc.config
    same_weights(ref, back.model)


def test_diffusers_round_trip_via_export(tmp_path, cfg):
    ref = random_controlnet(cfg)
    lc = load_control(save(tmp_path / "a.safetensors", ref.state_dict()))
    folder = save_diffusers(lc, tmp_path / "diffusers", addition_time_embed_dim=8)
    back = load_control(folder / "diffusion_pytorch_model.safetensors")
    assert back.format == "diffusers" and back.config == lc.config
    same_weights(ref, back.model)


def test_shuffle_flag_set_detected_and_kept(tmp_path):
    ref = random_controlnet(SD15_TINY)
    plain = save(tmp_path / "control_v11e_sd15_shuffle.safetensors", ref.state_dict())
    lc = load_control(plain)
    assert lc.config.global_average_pooling  # the official file has nothing but its name to go by
    assert not load_control(plain, global_average_pooling=False).config.global_average_pooling
    exported = save_ldm(lc, tmp_path / "renamed.safetensors")
    assert load_control(exported).config.global_average_pooling  # carried in our metadata, whatever the name
    res = lc.residuals(*inputs(SD15_TINY))
    for r in res.tensors():
        assert torch.equal(r, r[:, :, :1, :1].expand_as(r))


def base_unet_sd(cfg, seed=11):
    return {k: v for k, v in comfy_unet(cfg, seed=seed).state_dict().items()}


def test_diff_controlnet_needs_base_and_adds_it(comfy, tmp_path, cfg):
    ref = random_controlnet(cfg, seed=2)
    base = base_unet_sd(cfg)
    stored = {}
    for k, v in ref.state_dict().items():
        stored["control_model." + k] = v - base[k] if k in base else v
    stored["difference"] = torch.tensor([])
    path = save(tmp_path / "diff_control.safetensors", stored)
    with pytest.raises(BaseModelRequiredError, match="base model"):
        load_control(path)
    full_ckpt = save(tmp_path / "base.safetensors", {"model.diffusion_model." + k: v for k, v in base.items()})
    lc = load_control(path, base_unet=full_ckpt)
    assert lc.format == "diff"
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(lc.model.state_dict()[k], v, rtol=1e-6, atol=1e-6)


def test_control_lora_is_base_plus_low_rank(comfy, tmp_path, cfg):
    base = base_unet_sd(cfg)
    shape_src = random_controlnet(cfg, seed=4)
    lora, expected = control_lora_state(shape_src.state_dict(), rank=4, seed=5), {}
    for k, v in shape_src.state_dict().items():
        if k in lora:  # stored whole
            expected[k] = v
        else:
            up, down = lora[k[: -len(".weight")] + ".up"], lora[k[: -len(".weight")] + ".down"]
            expected[k] = base[k] + (up.flatten(1) @ down.flatten(1)).reshape(v.shape)
    path = save(tmp_path / "control-lora-canny-rank4.safetensors", lora)
    with pytest.raises(BaseModelRequiredError):
        load_control(path)
    lc = load_control(path, base_unet=base)
    assert lc.format == "control-lora"
    got = lc.model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


T2I_CASES = {
    "full-sd15": T2IAdapterConfig(cin=192, channels=(64, 128, 256, 256)),
    "full-sd15-sketch": T2IAdapterConfig(cin=64, channels=(64, 128, 256, 256)),
    "full-sdxl": T2IAdapterConfig(cin=768, channels=(64, 128, 256, 256), xl=True),
    "light": T2IAdapterConfig(light=True, cin=192, channels=(64, 128, 256, 256), nums_rb=4, ksize=3),
}


def comfy_t2i(cfg):
    from comfy.t2i_adapter import adapter

    if cfg.light:
        return adapter.Adapter_light(cin=cfg.cin, channels=list(cfg.channels), nums_rb=cfg.nums_rb)
    return adapter.Adapter(cin=cfg.cin, channels=list(cfg.channels), nums_rb=2, ksize=cfg.ksize, sk=True, use_conv=cfg.use_conv, xl=cfg.xl)


@pytest.mark.parametrize("name", list(T2I_CASES))
@pytest.mark.parametrize("layout", ["orig", "adapter-prefix", "diffusers"])
def test_t2i_adapter_layouts_match_comfy(comfy, tmp_path, name, layout):
    cfg = T2I_CASES[name]
    ref = randomize_(T2IAdapter(cfg), 6).eval()
    sd = ref.state_dict()
    if layout == "adapter-prefix":
        sd = {"adapter." + k: v for k, v in sd.items()}
    elif layout == "diffusers":
        names = t2i_fmt.to_diffusers_map(sd, cfg.light)
        sd = {names[k]: v for k, v in sd.items()}
    lc = load_control(save(tmp_path / "t2i.safetensors", sd))
    assert lc.kind == "t2i_adapter" and lc.config == cfg
    theirs = comfy_t2i(cfg).eval()
    theirs.load_state_dict(ref.state_dict())
    hint = torch.rand(2, cfg.hint_channels, 64, 64)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        res = lc.residuals(x, hint, None, None)
        out = theirs(hint)
        if isinstance(out, dict):  # ComfyUI 0.8: {"input": reversed list, "middle": [...]}
            out = list(reversed(out["input"])) + list(out.get("middle") or [])
        feats = [f for f in out if f is not None]
    ours = [t for t in res.input if t is not None] + ([res.mid] if res.mid is not None else [])
    assert len(ours) == len(feats)
    for a, b in zip(ours, feats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if cfg.xl:
        assert [i for i, t in enumerate(res.input) if t is not None] == [3, 5, 8] and res.mid is not None
    else:
        assert [i for i, t in enumerate(res.input) if t is not None] == [2, 5, 8, 11]


def test_t2i_round_trip_both_layouts(tmp_path):
    cfg = T2I_CASES["full-sd15"]
    ref = randomize_(T2IAdapter(cfg), 1)
    lc = load_control(save(tmp_path / "a.safetensors", ref.state_dict()))
    same_weights(ref, load_control(save_ldm(lc, tmp_path / "b.safetensors")).model)
    folder = save_diffusers(lc, tmp_path / "d")
    back = load_control(folder / "diffusion_pytorch_model.safetensors")
    assert back.format == "t2i-full-diffusers"
    same_weights(ref, back.model)


def test_hint_encoding_is_cached_across_steps():
    model = random_controlnet(SD15_TINY)
    x, hint, t, ctx, y = inputs(SD15_TINY)
    calls = []
    h = model.input_hint_block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a = model(x, hint, t, ctx)
        b = model(x, hint, t * 0.5, ctx)
        assert len(calls) == 1
        hint.mul_(0.5)  # in-place change: the cache must notice
        c = model(x, hint, t, ctx)
        assert len(calls) == 2
        model(x, hint.to(torch.float64), t, ctx)  # a new tensor
        assert len(calls) == 3
    h.remove()
    assert not torch.equal(a.down[0], c.down[0])
    assert not torch.equal(a.down[1], b.down[1])  # the timestep still matters downstream
