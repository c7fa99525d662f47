"""Datasets are checked before step 1: every bad file named in one error, mixed sizes and oversized batches refused
with the size, the limit and what to change; through the library, the toy and sd commands (the node: test_train_node)."""
import json

import cv2
import numpy as np
import pytest
import torch

from controlnet_core import LimitExceededError, create_from_unet
from controlnet_core.train import Buckets, ControlDataset, DatasetError, TrainConfig, Trainer
from controlnet_core.train.__main__ import main
from controlnet_core.train.dataset_check import MAX_LISTED
from controlnet_core.train.toy import TOY_UNET, ToyTextEncoder, make_fill50k, toy_encode_image
from controlnet_core.unet import UNetModel


def trainer(dataset, batch_size=2):
    unet = UNetModel(TOY_UNET).eval()
    return Trainer(unet, create_from_unet(unet.state_dict()), ToyTextEncoder(), toy_encode_image, dataset,
                   TrainConfig(lr=1e-3, batch_size=batch_size))


def resize_pair(root, i, size):
    """Rewrite pair i of a fill50k folder (condition and image) at size (h, w)."""
    for d in ("source", "target"):
        cv2.imwrite(str(root / d / f"{i}.png"), np.full((*size, 3), 90 * (d == "target"), np.uint8))


def test_every_bad_file_is_named_in_one_error_before_training(tmp_path):
    root = make_fill50k(tmp_path / "d", n=8)
    (root / "target" / "1.png").unlink()  # missing
    (root / "target" / "2.png").write_bytes(b"<html>not an image</html>")  # garbage
    png = (root / "target" / "3.png").read_bytes()
    (root / "target" / "3.png").write_bytes(png[: len(png) // 2])  # truncated: the header is fine, the data is not
    cv2.imwrite(str(root / "source" / "4.png"), np.zeros((32, 48, 3), np.uint8))  # condition of another size
    (root / "source" / "5.png").write_bytes(b"")  # empty
    with open(root / "prompt.json", "a") as f:
        f.write('{"source": "source/0.png"}\n')  # no target
    with pytest.raises(DatasetError) as e:
        ControlDataset(root)
    msg = str(e.value)
    assert "6 problems" in msg and "\n" not in msg
    for part in ("target/1.png: does not exist", "target/2.png: not a readable image", "target/3.png: not a readable image",
                 "source/4.png: is 48x32 but its image target/4.png is 64x64 (a condition must have its image's size)",
                 "source/5.png: not a readable image", "prompt.json: line 9: expected"):
        assert part in msg, part
    assert "target/0.png" not in msg and "source/6.png" not in msg  # good files are not named
    assert msg.count("; ") == 5  # one separator between problems, none inside one


def noise(size=(64, 64)):
    """Incompressible pixels, so a JPEG of them has a long entropy-coded part to cut."""
    return np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.mark.parametrize("decoder", ["pillow", "opencv"])
def test_truncated_jpeg_and_png_are_named(tmp_path, monkeypatch, decoder):
    """Issue 12: OpenCV decodes a cut JPEG (grey below the cut, a libjpeg warning only); the check finds it, and a cut
    PNG, from their missing end markers, with Pillow or with the OpenCV fallback. Complete files pass, also with bytes
    appended after the end marker (as phones append a motion photo)."""
    import sys

    if decoder == "opencv":
        monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` raises ImportError: the fallback
    root = tmp_path / "plain"
    for d in ("images", "conditions"):
        (root / d).mkdir(parents=True)
    for i in range(5):
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), noise())
        cv2.imwrite(str(root / "conditions" / f"{i}.png"), noise())
    assert len(ControlDataset(root)) == 5
    jpeg, png = (root / "images" / "1.jpg").read_bytes(), (root / "conditions" / "2.png").read_bytes()
    assert jpeg.endswith(b"\xff\xd9") and png.endswith(b"IEND\xaeB`\x82")
    (root / "images" / "1.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # cut inside the entropy-coded data
    (root / "conditions" / "2.png").write_bytes(png[: len(png) * 2 // 3])
    (root / "images" / "3.jpg").write_bytes(jpeg[:-2])  # only the end marker missing
    (root / "images" / "4.jpg").write_bytes(jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # appended data: complete
    (root / "conditions" / "4.png").write_bytes(png + b"appended by another program")
    cut = cv2.imread(str(root / "images" / "1.jpg"))
    assert cut is not None and cut.shape == (64, 64, 3)  # what the check is for: OpenCV reads it as an image
    msg = str(pytest.raises(DatasetError, ControlDataset, root).value)
    assert "3 problems" in msg and "\n" not in msg and msg.count("; ") == 2, msg
    for name, data, marker in (("images/1.jpg", jpeg[: len(jpeg) * 2 // 3], "JPEG end-of-image marker FF D9"),
                               ("conditions/2.png", png[: len(png) * 2 // 3], "PNG end chunk IEND"),
                               ("images/3.jpg", jpeg[:-2], "JPEG end-of-image marker FF D9")):
        assert f"{name}: not a readable image (truncated: its {len(data)} bytes end without the {marker})" in msg, name
    assert "4.jpg" not in msg and "4.png" not in msg and "0.jpg" not in msg


def test_truncation_check_is_exact_at_every_cut(tmp_path):
    """Every length of a real JPEG and PNG short of the whole file is reported; the whole file never is."""
    from controlnet_core.train.dataset_check import truncation

    for ext in ("jpg", "png"):
        path = tmp_path / f"whole.{ext}"
        cv2.imwrite(str(path), noise((16, 24)))
        data, cut = path.read_bytes(), tmp_path / f"cut.{ext}"
        assert truncation(path) is None
        for n in range(8, len(data)):
            cut.write_bytes(data[:n])
            assert truncation(cut) is not None, (ext, n, len(data))


def test_a_long_list_is_cut_with_a_count(tmp_path):
    root = make_fill50k(tmp_path / "d", n=MAX_LISTED + 10)
    for p in (root / "target").iterdir():
        p.write_bytes(b"x")
    msg = str(pytest.raises(DatasetError, ControlDataset, root).value)
    assert f"{MAX_LISTED + 10} problems" in msg and msg.endswith("; and 10 more.") and msg.count("not a readable image") == MAX_LISTED


def test_folder_layout_names_images_without_conditions_and_unreadable_captions(tmp_path):
    root = tmp_path / "plain"
    for d in ("images", "conditions", "captions"):
        (root / d).mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.zeros((64, 64, 3), np.uint8))
        if i != 1:
            cv2.imwrite(str(root / "conditions" / f"{i}.png"), np.zeros((64, 64, 3), np.uint8))
    (root / "captions" / "2.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    msg = str(pytest.raises(DatasetError, ControlDataset, root).value)
    assert "2 problems" in msg and "images/1.png: no condition image conditions/1.*" in msg and "captions/2.txt: caption not readable as UTF-8" in msg


def test_mixed_sizes_never_reach_torch_stack(tmp_path):
    root = make_fill50k(tmp_path / "d", n=6)
    resize_pair(root, 2, (96, 80))
    ds = ControlDataset(root)  # the files are fine; training them as stored is not
    with pytest.raises(DatasetError, match=r"2 different sizes \(64x64: 5 \(e.g. target/0.png\), 80x96: 1 \(e.g. target/2.png\)\), "
                                           r"but a batch must share one size"):
        trainer(ds)
    tr = trainer(ControlDataset(root, size=64))  # a square size or buckets make them one size
    assert tr.next_batch()["target"].shape == (2, 3, 64, 64)
    assert trainer(ControlDataset(root, buckets=Buckets(resolution=64, step=64, max_ratio=2.0))).train_step() > 0


def test_a_dataset_without_checks_still_gets_a_named_error_not_a_stack_error(tmp_path):
    items = [{"hint": torch.zeros(3, h, 64), "target": torch.zeros(3, h, 64), "prompt": "", "key": None} for h in (64, 64, 32, 64)]
    tr = trainer(items, batch_size=4)
    with pytest.raises(DatasetError, match=r"a batch must share one size, but its hint tensors differ: sample \d+ 64x64"):
        tr.next_batch()


def test_memory_limits_per_image_and_per_batch(tmp_path, monkeypatch):
    root = make_fill50k(tmp_path / "d", n=4)
    with pytest.raises(LimitExceededError) as e:
        ControlDataset(root, size=4096).check_batches(1)
    assert ("training at 4096x4096 (the square training size) is 16.78 megapixels per image, above the limit of 4.7 megapixels "
            "per image. Lower the resolution, or raise the limit with the environment variable CNS_MAX_TRAIN_MEGAPIXELS") in str(e.value)
    bucketed = ControlDataset(root, buckets=Buckets(resolution=1024))
    bucketed.check_batches(16)  # 16 SDXL-size images: allowed
    with pytest.raises(LimitExceededError) as e:
        bucketed.check_batches(20)
    assert ("a batch of 20 images at 1024x1024 (its largest bucket) is 21.0 megapixels, above the limit of 19 megapixels per batch. "
            "Lower the batch size") in str(e.value) and "CNS_MAX_TRAIN_BATCH_MEGAPIXELS" in str(e.value)
    monkeypatch.setenv("CNS_MAX_TRAIN_BATCH_MEGAPIXELS", "0.01")
    with pytest.raises(LimitExceededError, match="a batch of 4 images at 64x64"):  # the Trainer checks before step 1
        trainer(ControlDataset(root), batch_size=4)
    monkeypatch.setenv("CNS_MAX_TRAIN_BATCH_MEGAPIXELS", "100")
    bucketed.check_batches(20)  # the variable raises the limit
    monkeypatch.setenv("CNS_MAX_TRAIN_MEGAPIXELS", "0.001")
    with pytest.raises(LimitExceededError, match=r"training at 64x64 \(the stored size\) is 0.00 megapixels per image, above the limit of "
                                                 r"0.001 megapixels per image. Downscale the images or train at a smaller square size"):
        ControlDataset(root).check_batches(1)
    monkeypatch.setenv("CNS_MAX_TRAIN_MEGAPIXELS", "lots")
    with pytest.raises(LimitExceededError, match=r"CNS_MAX_TRAIN_MEGAPIXELS='lots' is not a positive number of megapixels"):
        bucketed.check_batches(1)


def test_stored_files_above_the_file_limit_are_named(tmp_path, monkeypatch):
    root = make_fill50k(tmp_path / "d", n=3)
    resize_pair(root, 1, (200, 300))
    monkeypatch.setenv("CNS_MAX_TRAIN_FILE_MEGAPIXELS", "0.05")
    msg = str(pytest.raises(DatasetError, ControlDataset, root, size=64).value)
    assert "2 problems" in msg and "target/1.png: is 300x200 (0.06 megapixels), above the limit of 0.05 megapixels for a stored image" in msg
    assert "source/1.png: is 300x200" in msg and "CNS_MAX_TRAIN_FILE_MEGAPIXELS" in msg


def run_main(capsys, *args):
    rc = main([*map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.err


def test_toy_command_reports_bad_data_in_one_error_line(tmp_path, capsys):
    root = make_fill50k(tmp_path / "d", n=4)
    (root / "target" / "0.png").write_bytes(b"x")
    (root / "source" / "3.png").unlink()
    rc, err = run_main(capsys, "toy", root, "--out", tmp_path / "out", "--steps", 1, "--batch", 2)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "2 problems" in err
    assert "target/0.png: not a readable image" in err and "source/3.png: does not exist" in err
    assert not (tmp_path / "out").exists()
    good = make_fill50k(tmp_path / "e", n=4)
    resize_pair(good, 1, (128, 128))
    rc, err = run_main(capsys, "toy", good, "--out", tmp_path / "out", "--steps", 1, "--batch", 2)
    assert rc == 2 and err.count("\n") == 1 and "a batch must share one size" in err


def test_sd_command_checks_data_and_memory_before_loading_the_base(tmp_path, capsys):
    root = make_fill50k(tmp_path / "d", n=4)
    (root / "target" / "2.png").write_bytes(b"x")
    missing_base = tmp_path / "never_read.safetensors"  # not there: loading it would be a different error
    common = ("sd", "--base", missing_base, "--out", tmp_path / "out", "--steps", 1)
    rc, err = run_main(capsys, *common, "--data", root, "--resolution", 64)
    assert rc == 2 and err.count("\n") == 1 and "target/2.png: not a readable image" in err
    good = make_fill50k(tmp_path / "e", n=4)
    rc, err = run_main(capsys, *common, "--data", good, "--resolution", 4096)
    assert rc == 2 and "4096x4096" in err and "limit of 4.7 megapixels per image" in err
    rc, err = run_main(capsys, *common, "--data", good, "--resolution", 1024, "--batch", 32)
    assert rc == 2 and "a batch of 32 images at 1024x1024" in err and "Lower the batch size" in err
    assert not (tmp_path / "out").exists()


def test_a_valid_json_line_with_an_absolute_path_outside_the_folder_is_named_as_is(tmp_path):
    root = make_fill50k(tmp_path / "d", n=2)
    lines = root.joinpath("prompt.json").read_text().splitlines()
    d = json.loads(lines[1])
    d["target"] = str(tmp_path / "elsewhere.png")
    root.joinpath("prompt.json").write_text("\n".join([lines[0], json.dumps(d)]) + "\n")
    msg = str(pytest.raises(DatasetError, ControlDataset, root).value)
    assert f"{tmp_path / 'elsewhere.png'}: does not exist" in msg
