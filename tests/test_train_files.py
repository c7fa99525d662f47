"""Nothing of a user's is lost to training (issue 12, item 1), through the library, the CLI and the ComfyUI node:
no run folder or model file is replaced without --overwrite / overwrite on; a damaged checkpoint is named with the
way on (the previous good one is kept); resuming on another dataset is refused."""
import io
import os
import subprocess
import sys

import pytest
import torch
from clip_checkpoint import fp32_text_encoder, tiny_checkpoint_with_clip
from host import Graph, PromptFailed

from controlnet_core import ControlNetError
from controlnet_core.train.run_files import DamagedCheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from controlnet_core.train.toy import make_fill50k

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
COMMON = ("--steps", 3, "--batch", 2, "--lr", 1e-3, "--save-every", 1)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlnet_core.train", *map(str, args)], env=ENV, capture_output=True, text=True, timeout=600)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def state(step: int) -> dict:
    return {"controlnet": {"w": torch.ones(2) * step}, "optimizer": {}, "step": step, "epoch": 0, "position": step, "gen": torch.zeros(1),
            "prompt_rng": torch.zeros(1), "prompt_rng_gauss": None, "config": {}}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def damaged_variants(good: bytes) -> dict[str, bytes]:
    evil = io.BytesIO()
    torch.save({"step": Evil()}, evil)  # a torch checkpoint whose pickle would run a command
    return {"empty": b"", "truncated": good[: len(good) // 2], "random bytes": os.urandom(4096), "foreign pickle": evil.getvalue()}


# -- library --------------------------------------------------------------------------------------------------------

def test_each_save_keeps_the_previous_good_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state(1), path)
    save_checkpoint(state(2), path)
    assert read_checkpoint(path)["step"] == 2 and read_checkpoint(tmp_path / "checkpoint.prev.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no .part left


@pytest.mark.parametrize("kind", ["empty", "truncated", "random bytes", "foreign pickle"])
def test_a_damaged_checkpoint_is_named_with_the_way_on(tmp_path, kind):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state(4), path)
    save_checkpoint(state(5), path)
    path.write_bytes(damaged_variants(path.read_bytes())[kind])
    with pytest.raises(DamagedCheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg and "checkpoint.prev.pt (step 4)" in msg and "rename it to checkpoint.pt" in msg, msg
    assert "weights_only=False" not in msg and "\x1b[" not in msg and "\n" not in msg, msg
    if kind == "foreign pickle":
        assert "never loaded" in msg and ("os.system" in msg or "posix.system" in msg), msg
    (tmp_path / "checkpoint.prev.pt").unlink()
    with pytest.raises(DamagedCheckpointError, match="No earlier good checkpoint"):
        load_checkpoint(path)


# -- the CLI --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_run")
    data = make_fill50k(root / "data", n=4, size=64, seed=0)
    out = root / "run"
    r = cli("toy", data, "--out", out, *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, out


def test_cli_never_starts_over_in_a_run_folder_without_overwrite(finished_run, tmp_path):
    data, out = finished_run
    before = files(out)
    r = cli("toy", data, "--out", out, *COMMON)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(out) in r.stderr and "already holds a training run" in r.stderr and "step 3" in r.stderr and "--overwrite" in r.stderr
    assert files(out) == before
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, blob in before.items():
        (copy / name).write_bytes(blob)
    r = cli("toy", data, "--out", copy, "--steps", 2, "--batch", 2, "--lr", 1e-3, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == 2  # replaced, as asked


@pytest.mark.parametrize("kind", ["empty", "truncated", "random bytes"])
def test_cli_resume_from_a_damaged_checkpoint_names_it_and_never_restarts(finished_run, tmp_path, kind):
    data, out = finished_run
    run = tmp_path / "run"
    run.mkdir()
    for name, blob in files(out).items():
        (run / name).write_bytes(blob)
    (run / "checkpoint.pt").write_bytes(damaged_variants((run / "checkpoint.pt").read_bytes())[kind])
    before = files(run)
    r = cli("toy", data, "--out", run, *COMMON, "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{run / 'checkpoint.pt'} is damaged" in r.stderr and "checkpoint.prev.pt (step 3)" in r.stderr, r.stderr
    assert files(run) == before  # nothing trained, nothing written


def test_cli_resume_on_another_dataset_is_refused(finished_run, tmp_path):
    data, out = finished_run
    other = make_fill50k(tmp_path / "other", n=4, size=64, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    for name, blob in files(out).items():
        (run / name).write_bytes(blob)
    r = cli("toy", other, "--out", run, *COMMON, "--steps", 4, "--resume")
    assert r.returncode == 2 and "another dataset" in r.stderr and "4 pairs" in r.stderr, r.stderr[-3000:]
    r = cli("toy", data, "--out", run, *COMMON[2:], "--steps", 4, "--resume")  # the original one resumes
    assert r.returncode == 0 and "resumed at step 3" in r.stdout, r.stderr[-3000:]


# -- the ComfyUI node -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_checkpoint(host):
    with fp32_text_encoder():
        yield tiny_checkpoint_with_clip(host)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("node_data") / "fill", n=2, size=64, seed=2)


def train_graph(ckpt_name, dataset, name, **kw):
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    inputs = dict(model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2), dataset_folder=str(dataset), steps=1, learning_rate=1e-3, batch_size=2,
                  empty_prompt_rate=0.5, resolution=64, seed=3, output_name=name, resume=False, gradient_checkpointing=False)
    inputs.update(kw)
    g.add("ControlNetSuiteTrain", **inputs)
    return g.prompt


def failure(host, prompt) -> str:
    with pytest.raises(PromptFailed) as e:
        host.run(prompt)
    return str(e.value)


def test_node_never_replaces_a_model_it_did_not_write(host, clip_checkpoint, dataset):
    """The user names the run after a downloaded ControlNet: the node stops before training, the file is intact;
    with overwrite on it is replaced, and the log says so."""
    downloaded = host.dirs["controlnet"] / "control_v11p_sd15_canny.safetensors"
    downloaded.write_bytes(b"a downloaded model, kept byte for byte")
    msg = failure(host, train_graph(clip_checkpoint, dataset, "control_v11p_sd15_canny"))
    assert "Train ControlNet (Suite)" in msg and str(downloaded) in msg and "overwrite on" in msg and "another output_name" in msg, msg
    assert downloaded.read_bytes() == b"a downloaded model, kept byte for byte"
    host.run(train_graph(clip_checkpoint, dataset, "control_v11p_sd15_canny", overwrite=True))
    assert downloaded.read_bytes()[:8] != b"a downloa"


def test_node_continues_its_own_run_but_never_starts_over_on_it(host, clip_checkpoint, dataset, caplog):
    name = "safety_cn"
    host.run(train_graph(clip_checkpoint, dataset, name))
    out = host.dirs["controlnet"] / f"{name}.safetensors"
    run = host.dirs["output"] / "controlnet_training" / name
    first = out.read_bytes()
    host.run(train_graph(clip_checkpoint, dataset, name, steps=2, resume=True))  # its own file: replaced by the continuation
    assert out.read_bytes() != first and torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    before = out.read_bytes(), (run / "checkpoint.pt").read_bytes()
    msg = failure(host, train_graph(clip_checkpoint, dataset, name, steps=3))  # resume off on an existing run
    assert "already holds a training run" in msg and "step 2" in msg and "resume on" in msg and "overwrite on" in msg, msg
    assert (out.read_bytes(), (run / "checkpoint.pt").read_bytes()) == before

    (run / "checkpoint.pt").write_bytes(b"")
    msg = failure(host, train_graph(clip_checkpoint, dataset, name, steps=3, resume=True))
    assert f"{run / 'checkpoint.pt'} is damaged" in msg and "checkpoint.prev.pt (step 1)" in msg and "output_name" in msg, msg
    assert out.read_bytes() == before[0]


def test_errors_derive_from_the_library_hierarchy():
    from controlnet_core.train.run_files import DatasetChangedError, RunExistsError

    assert all(issubclass(c, ControlNetError) for c in (DamagedCheckpointError, DatasetChangedError, RunExistsError))
