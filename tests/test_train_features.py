"""Trainer features: gradient checkpointing, EMA, disk caches, aspect-ratio buckets, annotator conditions,
loss/validation PNGs, the DDIM sampler behind them, and FSDP. Toy-sized models, real data on disk."""
import ctypes
import gc
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from factories import randomize_
from PIL import Image
from safetensors.torch import load_file

from annotators.training import annotator_condition
from controlnet_core import create_from_unet, load_control
from controlnet_core.errors import ControlNetError
from controlnet_core.train import ControlDataset, DatasetError, TrainConfig, Trainer, checkpointing
from controlnet_core.train.buckets import Buckets, epoch_order, fit
from controlnet_core.train.cache import TextCache, encoder_identity
from controlnet_core.train.report import TrainingReport
from controlnet_core.train.sampling import ddim_sample, make_sample_fn
from controlnet_core.train.toy import TOY_UNET, ToyTextEncoder, make_fill50k, toy_decode_latent, toy_encode_image
from controlnet_core.train.trainer import sd_alphas_cumprod
from controlnet_core.unet import UNetModel


def fill(tmp_path, n=8):
    root = tmp_path / "fill"
    return root if root.exists() else make_fill50k(root, n=n)


def build(tmp_path, config=None, dataset=None, text=None, vae=None, seed=0):
    config = config or TrainConfig(lr=1e-3, batch_size=4)
    unet = randomize_(UNetModel(TOY_UNET), seed).eval()
    cn = create_from_unet(unet.state_dict(), seed=seed)
    ds = dataset if dataset is not None else ControlDataset(fill(tmp_path))
    return Trainer(unet, cn, text or ToyTextEncoder(), vae or toy_encode_image, ds, config)


def weights(tr):
    return {k: v.detach().clone() for k, v in tr.controlnet.state_dict().items()}


def fixed_loss(tr, batch, seed=123):
    """The loss of `batch` with fixed noise and timesteps (the trainer's generator reseeded)."""
    tr.gen.manual_seed(seed)
    return tr.loss(batch)


# -- gradient checkpointing --


@pytest.mark.parametrize("scope", ["controlnet", "all"])
@pytest.mark.parametrize("sd_locked", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, sd_locked, scope):
    plain = build(tmp_path, TrainConfig(lr=1e-3, batch_size=4, sd_locked=sd_locked))
    ckpt = build(tmp_path, TrainConfig(lr=1e-3, batch_size=4, sd_locked=sd_locked, gradient_checkpointing=scope))
    assert checkpointing.is_enabled(ckpt.controlnet.input_blocks[1]) and not checkpointing.is_enabled(plain.controlnet.input_blocks[1])
    assert checkpointing.is_enabled(ckpt.controlnet.middle_block)
    # "controlnet": only the trainable copy's blocks, as diffusers; "all": also its hint encoder and the UNet's blocks
    assert checkpointing.is_enabled(ckpt.unet.output_blocks[0][0]) == (scope == "all")
    assert checkpointing.is_enabled(ckpt.controlnet.input_hint_block) == (scope == "all")
    plain.train_step()  # one step first, so the copy's gradients are not zero (zero convs at 0 block them)
    ckpt.train_step()
    batch = plain.next_batch()
    ckpt.next_batch()
    grads = []
    for tr in (plain, ckpt):
        tr.optimizer.zero_grad(set_to_none=True)
        loss = fixed_loss(tr, batch)
        loss.backward()
        named = list(tr.controlnet.named_parameters()) + ([] if sd_locked else [("unet." + k, p) for k, p in tr.unet.named_parameters() if p.requires_grad])
        grads.append((loss.item(), {k: p.grad.clone() for k, p in named if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert l0 == l1
    assert g0.keys() == g1.keys() and any(k.startswith("input_blocks") for k in g0)
    if not sd_locked:
        assert any(k.startswith("unet.output_blocks") for k in g0)
    for k in g0:  # the recomputed forward is the same arithmetic (bit-identical on this CPU; tolerance for other kernels)
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-10, msg=k)


def _mallinfo():
    try:
        libc = ctypes.CDLL("libc.so.6")
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    f.restype = MallInfo2

    def in_use() -> int:  # heap bytes in use + bytes in mmapped chunks (large tensors)
        m = f()
        return m.uordblks + m.hblkhd

    return in_use


def test_gradient_checkpointing_holds_far_less_activation_memory(tmp_path):
    """Two measurements of what autograd holds between forward and backward: bytes that reach autograd's
    saved-tensor hooks (outside checkpointed blocks), and the C heap in use after the forward (glibc)."""
    ds = ControlDataset(fill(tmp_path), size=128)  # 16x16 latents: activations dominate
    in_use = _mallinfo()
    measured = {}
    for on in (False, "controlnet", "all"):
        tr = build(tmp_path, TrainConfig(lr=1e-3, batch_size=4, gradient_checkpointing=on), dataset=ds)
        batch = tr.next_batch()
        saved = []

        def pack(t, saved=saved):
            saved.append(t.untyped_storage().nbytes() if t.device.type == "cpu" else 0)
            return t

        fixed_loss(tr, batch)  # warm-up: one-time allocations out of the measurement
        gc.collect()
        gc.disable()  # no collection of earlier objects inside the measurement
        try:
            before = in_use() if in_use else 0
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = fixed_loss(tr, batch)
            held = (in_use() - before) if in_use else None
        finally:
            gc.enable()
        loss.backward()
        measured[on] = (sum(saved), held)
        del tr, loss
    (saved_plain, heap_plain), (saved_copy, heap_copy), (saved_ckpt, heap_ckpt) = measured[False], measured["controlnet"], measured["all"]
    assert saved_ckpt < 0.2 * saved_plain, measured
    assert saved_ckpt < saved_copy < 0.8 * saved_plain, measured  # the copy's blocks alone already hold less
    if heap_plain is not None:
        assert heap_plain > 10e6 and heap_ckpt < 0.3 * heap_plain and heap_copy < heap_plain, measured


def test_checkpointing_settings(tmp_path):
    """True means the default scope; a wrong value is refused naming the choices; a run resumes with checkpointing
    switched (it changes memory and time only), but not with a setting that changes the result."""
    assert checkpointing.scope_of(True) == checkpointing.DEFAULT_SCOPE and checkpointing.scope_of(False) is None
    with pytest.raises(ControlNetError, match="gradient_checkpointing must be False, True or one of 'controlnet', 'all', not 'some'"):
        TrainConfig(gradient_checkpointing="some")
    first = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2, gradient_checkpointing="all"))
    first.train(1, checkpoint=tmp_path / "ckpt.pt")
    resumed = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2))
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.step == 1
    with pytest.raises(ControlNetError, match="saved with settings"):
        build(tmp_path, TrainConfig(lr=2e-3, batch_size=2)).load_checkpoint(tmp_path / "ckpt.pt")


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path):
    a = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2))
    b = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2, gradient_checkpointing=True))
    la, lb = a.train(3), b.train(3)
    assert la == pytest.approx(lb, rel=1e-6)
    for k, v in weights(a).items():
        torch.testing.assert_close(b.controlnet.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


# -- EMA --


def test_ema_after_k_steps_equals_the_closed_form(tmp_path):
    d, k = 0.8, 4
    tr = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2, ema_decay=d))
    history = [weights(tr)]  # w_0 ... w_k
    for _ in range(k):
        tr.train_step()
        history.append(weights(tr))
    ema = tr.ema.weights()
    moved = 0
    for name in ema:
        # ema_k = d^k w_0 + sum_{i=1..k} (1-d) d^(k-i) w_i
        expected = d**k * history[0][name].double() + sum((1 - d) * d ** (k - i) * history[i][name].double() for i in range(1, k + 1))
        torch.testing.assert_close(ema[name].double(), expected, rtol=1e-6, atol=1e-8, msg=name)
        moved += not torch.equal(ema[name], history[-1][name])
    assert moved > 0 and tr.ema.updates == k  # the EMA lags the weights: it is not just a copy


def test_ema_is_checkpointed_resumed_exactly_and_exported(tmp_path):
    cfg = TrainConfig(lr=1e-3, batch_size=2, ema_decay=0.9)
    straight = build(tmp_path, cfg)
    straight.train(4)
    first = build(tmp_path, cfg)
    first.train(2, checkpoint=tmp_path / "ckpt.pt")
    resumed = build(tmp_path, cfg)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    resumed.train(2)
    a, b = straight.ema.weights(), resumed.ema.weights()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # export: the EMA weights by default when EMA is on, the raw weights on request
    path = resumed.save_controlnet(tmp_path / "ema.safetensors")
    raw = resumed.save_controlnet(tmp_path / "raw.safetensors", ema=False)
    fe, fr = load_file(path), load_file(raw)
    cur = resumed.controlnet.state_dict()
    assert all(torch.equal(fe["control_model." + k], v) for k, v in b.items())
    assert all(torch.equal(fr["control_model." + k], v) for k, v in cur.items())
    assert any(not torch.equal(fe["control_model." + k], cur[k]) for k in b)
    assert load_control(path).config == resumed.controlnet.config
    with pytest.raises(ControlNetError, match="keeps no EMA"):
        build(tmp_path).export_controlnet(ema=True)


# -- caches --


class CountingText(torch.nn.Module):
    """The real toy text encoder, counting calls and prompts."""

    def __init__(self, seed=9):
        super().__init__()
        self.inner = ToyTextEncoder(seed=seed)
        self.calls, self.prompts = 0, []

    def forward(self, prompts):
        self.calls += 1
        self.prompts += list(prompts)
        return self.inner(prompts)


class CountingVAE(torch.nn.Module):
    """The real toy image encoder, counting calls and images."""

    def __init__(self):
        super().__init__()
        self.calls = self.images = 0

    def forward(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return toy_encode_image(x)


def test_cached_second_epoch_calls_no_encoder_and_trains_like_uncached(tmp_path):
    cache = tmp_path / "cache"
    cfg = dict(lr=1e-3, batch_size=4, empty_prompt_rate=0.5, seed=3)
    text, vae = CountingText(), CountingVAE()
    cached = build(tmp_path, TrainConfig(cache_dir=str(cache), **cfg), text=text, vae=vae)
    steps_per_epoch = len(cached.dataset) // 4
    losses = cached.train(steps_per_epoch)
    assert cached.epoch == 0 and vae.images == len(cached.dataset)
    assert "" in text.prompts and set(s.prompt for s in cached.dataset.samples) <= set(text.prompts)
    calls = (text.calls, vae.calls)
    losses += cached.train(steps_per_epoch)  # the second epoch
    assert (text.calls, vae.calls) == calls, "the second epoch called an encoder"
    plain = build(tmp_path, TrainConfig(**cfg))
    assert plain.train(2 * steps_per_epoch) == losses
    for k, v in weights(plain).items():
        assert torch.equal(cached.controlnet.state_dict()[k], v), k
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".safetensors" for p in files)  # no temporary files left behind
    # a new run on the same data and encoders finds everything on disk
    text2, vae2 = CountingText(), CountingVAE()
    again = build(tmp_path, TrainConfig(cache_dir=str(cache), **cfg), text=text2, vae=vae2)
    again.train(steps_per_epoch)
    assert text2.calls == vae2.calls == 0
    # an edited image is a miss; so is another text encoder
    target = cached.dataset.samples[0].target
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    text3, vae3 = CountingText(seed=10), CountingVAE()
    third = build(tmp_path, TrainConfig(cache_dir=str(cache), **cfg), text=text3, vae=vae3)
    third.train(steps_per_epoch)
    assert vae3.images == 1 and text3.calls >= 1  # only the touched file is encoded again; new text identity: all prompts


def test_text_cache_keeps_the_empty_prompt_and_distinguishes_encoders(tmp_path):
    enc = CountingText()
    c = TextCache(enc, tmp_path)
    out = c.encode_with_drop(["a red circle", "a blue circle"], [False, True])
    assert torch.equal(out[0], enc.inner([""])[0]) and torch.equal(out[1], enc.inner(["a blue circle"])[0])
    assert sorted(enc.prompts) == ["", "a blue circle", "a red circle"]
    assert encoder_identity(CountingText(seed=9)) == encoder_identity(enc) != encoder_identity(CountingText(seed=10))
    assert TextCache(CountingText(), tmp_path)([""]).shape == (1, 16, 32)
    small = TextCache(enc, tmp_path, memory_entries=2)  # bounded memory: older entries come back from disk
    calls = enc.calls
    first = small(["a red circle", "a blue circle", ""])
    assert len(small.memory) == 2 and enc.calls == calls
    assert torch.equal(small(["a red circle"])[0], first[0]) and enc.calls == calls


class Counting(torch.nn.Module):
    """Any real encoder (here: an SDXL base's text conditioner or VAE), counting calls and inputs; its cache
    identity is the wrapped encoder's."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls, self.inputs = 0, []

    @property
    def cache_identity(self):
        return encoder_identity(self.inner)

    def forward(self, x):
        self.calls += 1
        self.inputs += list(x) if isinstance(x, list) else [x.shape[0]]
        return self.inner(x)


def sdxl_trainer(tmp_path, config):
    """An SDXL-shaped base (tiny, random, the published key names; made with the ComfyUI host's classes) loaded as the
    CLI loads it, and a fresh ControlNet."""
    from base_factories import TOKENIZER_DIR, sdxl_checkpoint

    from controlnet_core.base_models import load_base_model

    ckpt = tmp_path / "xl.safetensors"
    if not ckpt.exists():
        sdxl_checkpoint(ckpt)
    base = load_base_model(ckpt, tokenizer=TOKENIZER_DIR, image_size=(64, 64))
    enc = base.unet.config.encoder
    cn = create_from_unet(base.unet.state_dict(), seed=0, num_heads=enc.num_heads, num_head_channels=enc.num_head_channels)
    text, vae = Counting(base.text), Counting(base.vae)
    return Trainer(base.unet, cn, text, vae, ControlDataset(fill(tmp_path, n=4), size=64), config), text, vae


def test_sdxl_text_cache_holds_context_and_y_and_trains_like_uncached(comfy, tmp_path):
    """SDXL's encode_text gives (context, y): both are cached; the second epoch calls no encoder; same weights."""
    cache = tmp_path / "cache"
    cfg = dict(lr=1e-3, batch_size=2, empty_prompt_rate=0.5, seed=3)
    cached, text, vae = sdxl_trainer(tmp_path, TrainConfig(cache_dir=str(cache), **cfg))
    steps_per_epoch = len(cached.dataset) // 2
    losses = cached.train(steps_per_epoch)
    assert "" in text.inputs and vae.inputs == [2] * steps_per_epoch
    calls = (text.calls, vae.calls)
    losses += cached.train(steps_per_epoch)  # the second epoch
    assert (text.calls, vae.calls) == calls, "the second epoch called an encoder"
    plain, _, _ = sdxl_trainer(tmp_path, TrainConfig(**cfg))
    assert plain.train(2 * steps_per_epoch) == losses
    for k, v in weights(plain).items():
        assert torch.equal(cached.controlnet.state_dict()[k], v), k
    entries = list((cache / "text").rglob("*.safetensors"))
    assert entries and all(set(load_file(e)) == {"value", "y"} for e in entries)
    # the empty-prompt replacement gives the cached "" pair; a second cache reads every pair from disk
    again = TextCache(text, cache)
    calls = text.calls
    context, y = again.encode_with_drop(["red circle with blue background", "x"], [False, True])
    assert text.calls == calls + 1 and text.inputs[-1:] == ["x"]  # only the new prompt was encoded
    empty_context, empty_y = again([""])  # the "" pair as cached in the first epoch (read back, no encoder call)
    assert text.calls == calls + 1
    assert torch.equal(context[0], empty_context[0]) and torch.equal(y[0], empty_y[0])
    for i, p in enumerate(["", "x"]):  # and they are the encoder's (up to the last bits another batch can change)
        fresh = text.inner([p])
        torch.testing.assert_close((context[i], y[i]), (fresh[0][0], fresh[1][0]), rtol=1e-5, atol=1e-6)
    # y carries the training size: another resolution is another identity, never a stale y
    text.inner.image_size = (128, 128)
    assert encoder_identity(text) != again.identity


def test_text_cache_entry_formats(tmp_path):
    """Single-tensor entries keep the format they always had ({"value"}); pair entries add "y". (SDXL encoders have
    identities of their own, so they never meet single entries; if one does under a reused identity, it re-encodes.)"""
    enc = CountingText()
    TextCache(enc, tmp_path, identity="same")(["a red circle"])
    (entry,) = list((tmp_path / "text").rglob("*.safetensors"))
    assert set(load_file(entry)) == {"value"}

    def pairs(prompts):
        c = enc.inner(prompts)
        return c, c[:, 0, :4]

    out = TextCache(pairs, tmp_path, identity="same")(["a red circle", "a blue circle"])
    assert isinstance(out, tuple) and torch.equal(out[1], out[0][:, 0, :4])
    assert set(load_file(entry)) == {"value", "y"}  # rewritten as a pair


# -- aspect-ratio buckets --


def test_buckets_are_multiples_of_64_with_near_constant_area():
    b = Buckets(resolution=512, step=64, max_ratio=2.0)
    sizes = b.sizes()
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and max(h, w) / min(h, w) <= 2.0
        assert abs(h * w / 512**2 - 1) <= 0.1, (h, w)
    assert len(sizes) == 9 and all((w, h) in sizes for h, w in sizes)  # both orientations
    assert b.nearest(1080, 1920) == (384, 704) and b.nearest(1000, 1000) == (512, 512) and b.nearest(1920, 1080) == (704, 384)


def _mixed_folder(root, sizes):
    """images/ + conditions/ + captions/ with images of the given (h, w): a filled circle, its outline as condition."""
    for d in ("images", "conditions", "captions"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        img = np.full((h, w, 3), (40 * i % 255, 90, 200), np.uint8)
        r = min(h, w) // 3
        cv2.circle(img, (w // 2, h // 2), r, (255, 255, 0), -1)
        cond = np.zeros_like(img)
        cv2.circle(cond, (w // 2, h // 2), r, (255, 255, 255), 1)
        cv2.imwrite(str(root / "images" / f"{i:02d}.png"), img)
        cv2.imwrite(str(root / "conditions" / f"{i:02d}.png"), cond)
        (root / "captions" / f"{i:02d}.txt").write_text(f"circle {i}")
    return root


SIZES = [(60, 200)] * 5 + [(200, 60)] * 3 + [(100, 100)] * 4 + [(150, 140)] * 2  # 5 wide, 3 tall, 6 square


def test_bucketed_batches_are_one_bucket_each_and_resume_exactly(tmp_path):
    root = _mixed_folder(tmp_path / "mixed", SIZES)
    buckets = Buckets(resolution=128, step=64, max_ratio=4.0)
    assert buckets.sizes() == [(64, 256), (128, 128), (256, 64)]
    ds = ControlDataset(root, buckets=buckets)
    assert ds.bucket_of == [(64, 256)] * 5 + [(256, 64)] * 3 + [(128, 128)] * 6
    # the circle stays round: cover-resize + centre crop, no squashing
    item = ds[0]
    ys, xs = np.nonzero((item["target"][1] > 0.9).numpy())  # green is 255 inside the circle, 90 around it
    assert item["target"].shape == (3, 64, 256) and abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 2
    cfg = TrainConfig(lr=1e-3, batch_size=2, seed=5)
    tr = build(tmp_path, cfg, dataset=ds)
    seen = []
    for _ in range(9):  # one epoch: 3 + 2 + 3 batches of 2 (buckets of 5 and 3 filled up), then into the next
        b = tr.next_batch()
        assert len({tuple(b["target"].shape[-2:])} | {tuple(b["hint"].shape[-2:])}) == 1
        assert tuple(b["target"].shape[-2:]) in buckets.sizes()
        seen.append(b["prompt"])
    first_epoch = [p for batch in seen[:8] for p in batch]
    assert set(first_epoch) == {f"circle {i}" for i in range(len(SIZES))} and tr.epoch == 1
    assert torch.equal(epoch_order(ds.bucket_of, 3, 5, 2), epoch_order(ds.bucket_of, 3, 5, 2))
    assert not torch.equal(epoch_order(ds.bucket_of, 3, 5, 2), epoch_order(ds.bucket_of, 4, 5, 2))
    # resume in the middle of an epoch: the same batches, the same weights
    straight = build(tmp_path, cfg, dataset=ds)
    straight.train(6)
    part = build(tmp_path, cfg, dataset=ds)
    part.train(3, checkpoint=tmp_path / "b.pt")
    resumed = build(tmp_path, cfg, dataset=ds)
    resumed.load_checkpoint(tmp_path / "b.pt")
    resumed.train(3)
    for k, v in weights(straight).items():
        assert torch.equal(resumed.controlnet.state_dict()[k], v), k


def test_fit_crops_the_centre_without_distortion():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the middle third
    out = fit(img, 64, 64)
    assert out.shape == (64, 64, 3) and out[:, 2:-2].min() == 255  # only the centre is left


# -- conditions from annotators --


def test_conditions_derived_by_an_annotator_equal_the_annotator_called_directly(tmp_path):
    from annotators import registry

    root = _mixed_folder(tmp_path / "plain", [(96, 128), (128, 96), (128, 128)])
    for p in (root / "conditions").iterdir():
        p.unlink()
    (root / "conditions").rmdir()
    with pytest.raises(DatasetError, match="images/ alone is enough"):
        ControlDataset(root)  # no conditions/ and no annotator
    params = dict(low_threshold=60, high_threshold=160, resolution=128)
    ds = ControlDataset(root, size=128, condition_fn=annotator_condition("canny", **params))
    canny = registry.load("canny")
    for i in range(len(ds)):
        item = ds[i]
        target01 = ((item["target"] + 1) * 127.5).round() / 255.0  # the uint8 image the dataset resized
        direct = canny(target01[None], **params)[0]
        assert torch.equal(item["hint"], direct)
        assert item["hint"].max() == 1.0 and item["hint"].mean() < 0.3  # edges: some white on black
    tr = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2), dataset=ds)
    assert math.isfinite(tr.train_step())
    with pytest.raises(ControlNetError, match="unknown annotator 'nope'"):
        annotator_condition("nope")
    with pytest.raises(ControlNetError, match="no parameter"):
        annotator_condition("canny", sigma=3)


# -- loss curve, validation grid, DDIM --


def test_loss_curve_and_validation_grid_are_written_and_continue_after_resume(tmp_path):
    out = tmp_path / "run"
    tr = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2))
    val = [tr.dataset[i] for i in range(3)]
    validation = {"hint": torch.stack([v["hint"] for v in val]), "prompt": [v["prompt"] for v in val]}
    sample_fn = make_sample_fn(tr.unet, tr.controlnet, tr.encode_text, toy_decode_latent, tr.alphas, steps=3, cfg=3.0)
    rep = TrainingReport(out, every=2, sample_fn=sample_fn, validation=validation, validate_every=2)
    losses = tr.train(3, checkpoint=out / "ckpt.pt", on_step=rep)
    rep.finish(tr.step)
    hist = json.loads((out / "losses.json").read_text())
    assert [hist[str(s)] for s in (1, 2, 3)] == losses
    for name in ("loss.png", "validation.png", "validation_step_2.png", "validation_step_3.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200, name
    with Image.open(out / "validation.png") as im:
        w, h = im.size
    assert h > 1.2 * w  # 3 rows (conditions) by 2 columns (condition, sample)
    # resumed: the history goes on from the checkpoint
    tr2 = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2))
    tr2.load_checkpoint(out / "ckpt.pt")
    rep2 = TrainingReport(out, every=1)
    tr2.train(1, on_step=rep2)
    assert sorted(map(int, json.loads((out / "losses.json").read_text()))) == [1, 2, 3, 4]


def test_ddim_matches_diffusers_and_a_fresh_controlnet_changes_nothing():
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    unet = randomize_(UNetModel(TOY_UNET), 0).eval()
    cn = create_from_unet(unet.state_dict(), seed=0)
    text = ToyTextEncoder()
    ctx = text(["red circle", "blue circle"])
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(5)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t.float().expand(2), ctx), t, x).prev_sample
    ours = ddim_sample(unet, None, None, ctx, None, sched.alphas_cumprod.float(), latent_shape=(4, 8, 8), steps=5, cfg=1.0, seed=11)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    unc = text(["", ""])
    kw = dict(latent_shape=(4, 8, 8), steps=4, cfg=5.0, seed=1)
    a = sd_alphas_cumprod()
    base = ddim_sample(unet, None, None, ctx, unc, a, **kw)
    assert torch.equal(ddim_sample(unet, cn, hint, ctx, unc, a, **kw), base)  # zero convs: the paper's step-0 identity
    with torch.no_grad():
        for p in cn.zero_convs.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(ddim_sample(unet, cn, hint, ctx, unc, a, **kw), base)


# -- FSDP --


def _fsdp_worker(rank, world, root, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(lr=1e-3, batch_size=2, distributed="fsdp", gradient_checkpointing=True, ema_decay=0.5)
        tr = build(root, cfg)
        assert hasattr(next(tr.controlnet.parameters()), "full_tensor")  # really sharded
        local = sum(p.to_local().numel() for p in tr.controlnet.parameters())
        total = sum(p.numel() for p in tr.controlnet.parameters())
        tr.train(2, checkpoint=root / "fsdp.pt")  # rank 0 writes full tensors
        resumed = build(root, cfg)
        resumed.load_checkpoint(root / "fsdp.pt")
        resumed.train(1)
        path = resumed.save_controlnet(root / "fsdp_raw.safetensors", ema=False)
        ema_path = resumed.save_controlnet(root / "fsdp_ema.safetensors")
        if rank == 0:
            torch.save({"local": local, "total": total, "path": str(path), "ema_path": str(ema_path)}, out)
        else:
            assert path is None
    finally:
        dist.destroy_process_group()


def test_two_process_fsdp_equals_one_process_with_the_doubled_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    fill(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, tmp_path, port, tmp_path / "fsdp_info.pt"), nprocs=2, join=True)
    info = torch.load(tmp_path / "fsdp_info.pt", weights_only=True)
    assert info["local"] < 0.6 * info["total"]  # each process holds about half of the parameters
    single = build(tmp_path, TrainConfig(lr=1e-3, batch_size=4, ema_decay=0.5))
    single.train(3)
    fsdp, fsdp_ema = load_file(info["path"]), load_file(info["ema_path"])
    ref, ref_ema = single.controlnet.state_dict(), single.ema.weights()
    for k, v in ref.items():
        # as the DDP test: all-reduce rounding through Adam's small second moments, ~1e-5; 3 steps of lr 1e-3 move ~3e-3
        torch.testing.assert_close(fsdp["control_model." + k], v, rtol=0, atol=1e-4, msg=k)
        torch.testing.assert_close(fsdp_ema["control_model." + k], ref_ema[k], rtol=0, atol=1e-4, msg=k)
    ckpt = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["controlnet"].keys() == ref.keys()
    assert all(v.shape == ref[k].shape for k, v in ckpt["controlnet"].items())  # full tensors, not shards
