"""Training as the paper does it, on a tiny model and a fill50k-like folder made here."""
import random

import cv2
import numpy as np
import pytest
import torch
from factories import randomize_

from controlnet_core import create_from_unet, load_control, save_ldm
from controlnet_core.train import ControlDataset, DatasetError, TrainConfig, Trainer, drop_prompts
from controlnet_core.train.toy import TOY_UNET, ToyTextEncoder, make_fill50k, toy_encode_image
from controlnet_core.unet import UNetModel

CFG = TOY_UNET.encoder
ToyText = ToyTextEncoder
toy_vae = toy_encode_image


def build(tmp_path, config=None, seed=0):
    config = config or TrainConfig(lr=1e-3, batch_size=4)
    unet = randomize_(UNetModel(TOY_UNET), seed).eval()
    cn = create_from_unet(unet.state_dict(), seed=seed)
    ds = ControlDataset(tmp_path / "fill") if (tmp_path / "fill").exists() else ControlDataset(make_fill50k(tmp_path / "fill"))
    return Trainer(unet, cn, ToyText(), toy_vae, ds, config)


def test_only_controlnet_parameters_learn_when_locked(tmp_path):
    tr = build(tmp_path)
    before = {k: v.clone() for k, v in tr.unet.state_dict().items()}
    cn_before = {k: v.clone() for k, v in tr.controlnet.state_dict().items()}
    tr.train_step()
    assert all(torch.equal(v, tr.unet.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in tr.unet.parameters())
    assert all(p.grad is None for p in tr.controlnet.parameters())  # freed right after the optimizer step
    changed = [k for k, v in cn_before.items() if not torch.equal(v, tr.controlnet.state_dict()[k])]
    # paper section 3.1: with zero convs at 0, the first step moves only the zero convs (the copy gets zero gradient) ...
    assert any(k.startswith("zero_convs") for k in changed) and not any(k.startswith("input_blocks") for k in changed)
    tr.train_step()
    # ... and from the second step on the trainable copy learns too
    assert any(not torch.equal(v, tr.controlnet.state_dict()[k]) for k, v in cn_before.items() if k.startswith("input_blocks"))


def test_unlocked_base_trains_the_decoder_only(tmp_path):
    tr = build(tmp_path, TrainConfig(lr=1e-3, sd_locked=False))
    enc = tr.unet.input_blocks[1][0].in_layers[2].weight.clone()
    dec = tr.unet.output_blocks[0][0].in_layers[2].weight.clone()
    tr.train_step()
    assert torch.equal(enc, tr.unet.input_blocks[1][0].in_layers[2].weight)
    assert not torch.equal(dec, tr.unet.output_blocks[0][0].in_layers[2].weight)


def test_half_of_the_prompts_are_emptied_over_a_pass():
    rng = random.Random(3)
    out = drop_prompts(["a prompt"] * 4000, 0.5, rng)
    share = out.count("") / len(out)
    assert abs(share - 0.5) < 0.03  # 4000 draws: 3 % is > 3.5 standard deviations
    assert drop_prompts(["x"] * 50, 0.0, rng) == ["x"] * 50


def test_the_trainer_empties_prompts_at_the_configured_rate(tmp_path):
    tr = build(tmp_path)
    seen = []
    tr.encode_text = lambda prompts: (seen.extend(prompts), ToyText()(prompts))[1]
    for _ in range(15):
        tr.loss(tr.next_batch())
    assert 0.3 < seen.count("") / len(seen) < 0.7


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path):
    tr = build(tmp_path, TrainConfig(lr=3e-4, batch_size=4, empty_prompt_rate=0.0))
    batch = tr.next_batch()

    def fixed_loss():
        g = tr.gen.get_state()
        tr.gen.manual_seed(123)
        v = tr.loss(batch)
        tr.gen.set_state(g)
        return v

    first = fixed_loss().item()
    for _ in range(8):
        loss = fixed_loss()
        tr.optimizer.zero_grad()
        loss.backward()
        tr.optimizer.step()
    assert fixed_loss().item() < first


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = build(tmp_path)
    straight.train(6)
    first = build(tmp_path)
    first.train(3, checkpoint=tmp_path / "ckpt.pt")
    resumed = build(tmp_path)
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    resumed.train(3)
    for k, v in straight.controlnet.state_dict().items():
        assert torch.equal(v, resumed.controlnet.state_dict()[k]), k
    assert not (tmp_path / "ckpt.pt.part").exists()


def test_a_checkpoint_from_before_newer_settings_existed_still_resumes(tmp_path):
    first = build(tmp_path)
    first.train(1, checkpoint=tmp_path / "ckpt.pt")
    s = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for new in ("gradient_checkpointing", "ema_decay", "cache_dir", "distributed"):  # added after the first release
        del s["config"][new]
    torch.save(s, tmp_path / "old.pt")
    resumed = build(tmp_path)
    resumed.load_checkpoint(tmp_path / "old.pt")
    assert resumed.step == 1
    changed = build(tmp_path, TrainConfig(lr=1e-3, batch_size=4, ema_decay=0.9))
    with pytest.raises(Exception, match="saved with settings"):
        changed.load_checkpoint(tmp_path / "old.pt")


def test_the_trained_controlnet_loads_in_our_loader_and_comfys(comfy, tmp_path):
    import comfy.controlnet

    tr = build(tmp_path)
    tr.train(2)
    path = save_ldm(tr.controlnet, tmp_path / "trained.safetensors")
    assert load_control(path).config.model_channels == 64
    assert comfy.controlnet.load_controlnet(str(path)) is not None


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset folder"):
        ControlDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "prompt.json").write_text("\n")
    with pytest.raises(DatasetError, match="prompt file is empty"):
        ControlDataset(tmp_path / "empty")
    root = make_fill50k(tmp_path / "d", n=3)
    (root / "target" / "1.png").unlink()
    with pytest.raises(DatasetError, match="target/1.png: does not exist"):
        ControlDataset(root)
    root = make_fill50k(tmp_path / "e", n=3)
    (root / "target" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="not a readable image"):
        ControlDataset(root)[1]
    root = make_fill50k(tmp_path / "f", n=3)
    cv2.imwrite(str(root / "source" / "2.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DatasetError, match="must have its image's size"):
        ControlDataset(root)[2]


def _ddp_worker(rank, world, root, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr = build(root, TrainConfig(lr=1e-3, batch_size=2))
        tr.train(3, checkpoint=root / "ddp.pt")
        if rank == 0:
            torch.save(tr.controlnet.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_with_the_doubled_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    make_fill50k(tmp_path / "fill")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, tmp_path, port, tmp_path / "ddp_weights.pt"), nprocs=2, join=True)
    single = build(tmp_path, TrainConfig(lr=1e-3, batch_size=4))
    single.train(3)
    ddp = torch.load(tmp_path / "ddp_weights.pt", weights_only=True)
    for k, v in single.controlnet.state_dict().items():
        # Adam divides by sqrt of tiny second moments, so all-reduce rounding shows up at ~1e-5; 3 steps of lr 1e-3 move weights ~3e-3
        torch.testing.assert_close(ddp[k], v, rtol=0, atol=1e-4, msg=k)
    half = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2))
    half.train(3)  # the test can fail: one process with only one rank's batch ends elsewhere
    assert max((half.controlnet.state_dict()[k] - v).abs().max().item() for k, v in single.controlnet.state_dict().items()) > 1e-3
    assert (tmp_path / "ddp.pt").is_file()  # rank 0 saved the checkpoint


def test_gradient_accumulation_is_one_step_over_the_averaged_micro_batches(tmp_path):
    acc = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2, grad_accum=2))
    ref = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2))
    acc.train_step()
    ref.optimizer.zero_grad()
    for _ in range(2):
        (ref.loss(ref.next_batch()) / 2).backward()
    ref.optimizer.step()
    assert acc.step == 1 and acc.position == ref.position == 4
    for k, v in ref.controlnet.state_dict().items():
        assert torch.equal(v, acc.controlnet.state_dict()[k]), k


def test_bf16_mixed_precision_stores_the_locked_base_in_bf16_and_trains(tmp_path):
    tr = build(tmp_path, TrainConfig(lr=1e-3, batch_size=2, mixed_precision="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in tr.unet.parameters())
    assert all(p.dtype == torch.float32 for p in tr.controlnet.parameters())  # trainable weights keep fp32 masters
    before = tr.controlnet.zero_convs[0][0].weight.clone()
    losses = tr.train(2)
    assert all(torch.isfinite(torch.tensor(losses))) and not torch.equal(before, tr.controlnet.zero_convs[0][0].weight)
