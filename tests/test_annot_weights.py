"""Weight files: verified download through the real code path (a file:// URL), .part + rename, offline mode, errors."""
import hashlib
import subprocess
import sys

import pytest

from annotators import weights


@pytest.fixture
def published(tmp_path):
    src = tmp_path / "server" / "tiny_model.pth"
    src.parent.mkdir()
    src.write_bytes(b"weights" * 1000)
    spec = weights.WeightFile("tiny_model.pth", src.as_uri(), hashlib.sha256(src.read_bytes()).hexdigest(), src.stat().st_size, "MIT", "test")
    weights.register(spec)
    yield spec
    weights.MANIFEST.pop("tiny_model.pth", None)


def test_fetch_verifies_and_renames(published, tmp_path, monkeypatch):
    monkeypatch.delenv("CNS_OFFLINE", raising=False)
    dest = tmp_path / "annotators"
    path = weights.fetch("tiny_model.pth", dest)
    assert path == dest / "tiny_model.pth" and path.stat().st_size == published.size
    assert not (dest / "tiny_model.pth.part").exists()
    assert weights.find("tiny_model.pth", [dest]) == path


def test_fetch_with_wrong_hash_leaves_nothing(published, tmp_path, monkeypatch):
    monkeypatch.delenv("CNS_OFFLINE", raising=False)
    weights.register(weights.WeightFile("tiny_model.pth", published.url, "f" * 64, None, "MIT", "test"))
    with pytest.raises(weights.AnnotatorWeightsError, match="deleted"):
        weights.fetch("tiny_model.pth", tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


def test_offline_mode_refuses_to_download(published, tmp_path, monkeypatch):
    monkeypatch.setenv("CNS_OFFLINE", "1")
    with pytest.raises(weights.AnnotatorWeightsError, match="offline"):
        weights.fetch("tiny_model.pth", tmp_path)
    with pytest.raises(weights.AnnotatorWeightsError, match="offline"):
        weights.find("tiny_model.pth", [tmp_path], auto_download=True)


def test_auto_download_when_asked(published, tmp_path, monkeypatch):
    monkeypatch.delenv("CNS_OFFLINE", raising=False)
    assert weights.find("tiny_model.pth", [tmp_path], auto_download=True).is_file()


def test_corrupt_weight_file_is_a_clear_error(tmp_path):
    p = tmp_path / "ControlNetHED.pth"
    p.write_bytes(b"\x80\x02garbage")
    with pytest.raises(weights.ControlNetError, match="ControlNetHED.pth"):
        weights.load_state_dict(p)


def test_cli_list_and_fetch(published, tmp_path):
    r = subprocess.run([sys.executable, "-m", "annotators", "list"], capture_output=True, text=True)
    assert r.returncode == 0 and "canny" in r.stdout
    r = subprocess.run([sys.executable, "-m", "annotators", "fetch", "no_such_file.pth", "--dest", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not in the annotator manifest" in r.stderr
