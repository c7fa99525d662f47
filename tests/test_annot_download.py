"""Downloads against a real HTTP server on 127.0.0.1 that stalls, trickles, truncates, serves other bytes, or fails once: each
ends within its timeout, is retried when another try can help, leaves no `.part`, and names the URL, the file and
where to put a copy by hand; through the library, `python -m annotators fetch` and an annotator node in ComfyUI."""
import hashlib
import http.server
import threading
import time

import pytest

from annotators import weights
from annotators.__main__ import main as annotators_main

PAYLOAD = bytes(range(256)) * 400  # 100 KB
FAST = dict(timeout=0.3, attempts=2, backoff=0.01)  # every test here ends in well under a few seconds


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers each request with the server's next planned behaviour (the last one repeats)."""

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests += 1
            mode = server.plan[min(server.requests, len(server.plan)) - 1]
        if mode == "stall":  # accept, then say nothing
            server.release.wait(10)
            return
        if mode == "trickle":  # a byte every 0.05 s: never silent for a read timeout, and never done
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            for i in range(len(PAYLOAD)):
                if server.release.wait(0.05):
                    return
                try:
                    self.wfile.write(PAYLOAD[i:i + 1])
                except OSError:  # the client gave up
                    return
            return
        if mode == "reset":  # close without an answer
            self.close_connection = True
            return
        if mode in ("503", "404"):
            self.send_error(int(mode))
            return
        body = PAYLOAD if mode != "wrong" else bytes(len(PAYLOAD))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if mode != "truncate" else body[: len(body) // 3])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.lock, srv.release, srv.requests, srv.plan = threading.Lock(), threading.Event(), 0, ["ok"]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def published(server, monkeypatch):
    monkeypatch.delenv("CNS_OFFLINE", raising=False)
    spec = weights.WeightFile("served_model.pth", f"http://127.0.0.1:{server.server_port}/served_model.pth",
                              hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD), "MIT", "test")
    weights.register(spec)
    yield spec
    weights.MANIFEST.pop(spec.filename, None)


def failed(dest, **kw):
    t0 = time.perf_counter()
    with pytest.raises(weights.DownloadError) as e:
        weights.fetch("served_model.pth", dest, **{**FAST, **kw})
    assert list(dest.iterdir()) == []  # no .part, no file
    return str(e.value), time.perf_counter() - t0


@pytest.mark.parametrize("mode, why", [("stall", "no data for 0.3 s"), ("truncate", "the connection closed with 68267 bytes still to come"),
                                       ("reset", "RemoteDisconnected"), ("503", "HTTP 503")])
def test_a_failing_server_is_retried_then_named_with_the_way_out(server, published, tmp_path, mode, why):
    server.plan = [mode]
    msg, seconds = failed(tmp_path)
    assert server.requests == 2 and seconds < 3
    assert f"download of served_model.pth from {published.url} failed after 2 attempts: {why}" in msg
    assert f"place it at {tmp_path / 'served_model.pth'} (SHA-256 {published.sha256})" in msg


@pytest.mark.parametrize("first", ["stall", "truncate", "reset", "503"])
def test_one_failure_then_success(server, published, tmp_path, first):
    server.plan = [first, "ok"]
    path = weights.fetch("served_model.pth", tmp_path, **FAST)
    assert path.read_bytes() == PAYLOAD and server.requests == 2 and list(tmp_path.iterdir()) == [path]


def test_wrong_bytes_and_client_errors_are_not_retried(server, published, tmp_path):
    server.plan = ["wrong"]
    msg, _ = failed(tmp_path, attempts=3)
    assert server.requests == 1 and "has SHA-256" in msg and "it was deleted" in msg and published.url in msg
    server.plan, server.requests = ["404"], 0
    msg, _ = failed(tmp_path, attempts=3)
    assert server.requests == 1 and "failed: HTTP 404" in msg


def test_nothing_listens(published, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    weights.register(weights.WeightFile("served_model.pth", f"http://127.0.0.1:{port}/x.pth", published.sha256, None, "MIT", "test"))
    msg, seconds = failed(tmp_path)
    assert "failed after 2 attempts: ConnectionRefusedError" in msg and seconds < 3


def test_ctrl_c_during_a_download_leaves_no_part_file(server, published, tmp_path):
    import urllib.request

    def interrupted(url, timeout):
        r = urllib.request.urlopen(url, timeout=timeout)
        r.read = r.read1 = lambda n: (_ for _ in ()).throw(KeyboardInterrupt) if (tmp_path / "served_model.pth.part").exists() else b""
        return r

    with pytest.raises(KeyboardInterrupt):
        weights.fetch("served_model.pth", tmp_path, opener=interrupted, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_settings_come_from_the_environment(server, published, tmp_path, monkeypatch):
    server.plan = ["stall"]
    monkeypatch.setenv("CNS_DOWNLOAD_TIMEOUT", "0.2")
    monkeypatch.setenv("CNS_DOWNLOAD_ATTEMPTS", "1")
    msg, seconds = failed(tmp_path, timeout=None, attempts=None, backoff=None)
    assert server.requests == 1 and "failed: no data for 0.2 s" in msg and seconds < 2
    monkeypatch.setenv("CNS_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(weights.AnnotatorWeightsError, match="CNS_DOWNLOAD_TIMEOUT='soon': expected a number"):
        weights.fetch("served_model.pth", tmp_path)


def test_a_trickling_server_meets_the_deadline(server, published, tmp_path, monkeypatch):
    """Issue 12: a byte every 0.05 s never trips the 0.3 s read timeout; the per-attempt deadline ends each attempt,
    and the error names the URL, the bytes received and the variable that raises the limit."""
    server.plan = ["trickle"]
    msg, seconds = failed(tmp_path, deadline=0.5)
    assert server.requests == 2 and seconds < 3, seconds
    assert f"download of served_model.pth from {published.url} failed after 2 attempts: still downloading after 0.5 s, " in msg, msg
    received = int(msg.split("still downloading after 0.5 s, ")[1].split(" bytes")[0])
    assert 0 < received < len(PAYLOAD) and f"{received} bytes of {len(PAYLOAD)} received (raise CNS_DOWNLOAD_DEADLINE, in seconds" in msg
    assert f"place it at {tmp_path / 'served_model.pth'}" in msg
    server.plan, server.requests = ["trickle", "ok"], 0  # a later attempt that is quick enough succeeds
    assert weights.fetch("served_model.pth", tmp_path, **FAST, deadline=0.5).read_bytes() == PAYLOAD and server.requests == 2
    monkeypatch.setenv("CNS_DOWNLOAD_DEADLINE", "0.3")  # from the environment
    server.plan, server.requests = ["trickle"], 0
    (tmp_path / "served_model.pth").unlink()
    msg, seconds = failed(tmp_path, attempts=1)
    assert server.requests == 1 and seconds < 2 and "failed: still downloading after 0.3 s" in msg, msg
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("CNS_DOWNLOAD_DEADLINE", bad)
        with pytest.raises(weights.AnnotatorWeightsError, match="CNS_DOWNLOAD_DEADLINE"):
            weights.fetch("served_model.pth", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_fetch_reports_the_failure_with_exit_code_2(server, published, tmp_path, monkeypatch, capsys):
    server.plan = ["truncate"]
    monkeypatch.setenv("CNS_DOWNLOAD_TIMEOUT", "0.3")
    monkeypatch.setenv("CNS_DOWNLOAD_ATTEMPTS", "2")
    monkeypatch.setenv("CNS_DOWNLOAD_BACKOFF", "0.01")
    assert annotators_main(["fetch", "served_model.pth", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "served_model.pth: download of served_model.pth" in err and "bytes still to come" in err and not any(tmp_path.iterdir())
    server.plan = ["ok"]
    assert annotators_main(["fetch", "served_model.pth", "--dest", str(tmp_path)]) == 0
    assert (tmp_path / "served_model.pth").read_bytes() == PAYLOAD


def test_an_annotator_node_auto_download_that_stalls_fails_in_time_with_the_way_out(host, server, monkeypatch):
    """ComfyUI's annotator node with CNS_AUTO_DOWNLOAD=1, its weight file's URL pointed at the stalling server."""
    import sys

    from host import Graph, PromptFailed

    from annotators import registry

    info = registry.load_all()["depth_anything_v2"]
    name = info.weights[0]
    assert not (host.dirs["annotators"] / name).exists()
    cls = host.nodes.NODE_CLASS_MAPPINGS[f"ControlNetSuiteAnnotator_{info.key}"]
    hosted = sys.modules[cls.__module__.rsplit(".nodes.", 1)[0] + ".annotators.weights"]  # the extension's own copy
    original = hosted.MANIFEST[name]
    url = f"http://127.0.0.1:{server.server_port}/{name}"
    monkeypatch.setitem(hosted.MANIFEST, name, hosted.WeightFile(name, url, original.sha256, original.size, original.licence, original.model))
    for var, value in (("CNS_AUTO_DOWNLOAD", "1"), ("CNS_DOWNLOAD_TIMEOUT", "0.3"), ("CNS_DOWNLOAD_ATTEMPTS", "2"), ("CNS_DOWNLOAD_BACKOFF", "0.01")):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("CNS_OFFLINE", raising=False)
    server.plan = ["stall"]
    g = Graph()
    img = (g.add("SuiteTestImage", width=64, height=64, channels=3, batch=1, seed=0), 0)
    kw = {k: spec[1]["default"] for k, spec in cls.INPUT_TYPES()["required"].items() if k != "image"}
    n = g.add(f"ControlNetSuiteAnnotator_{info.key}", image=img, **kw)
    g.add("SuiteTestCaptureImage", image=(n, 0), key="img")
    t0 = time.perf_counter()
    with pytest.raises(PromptFailed) as e:
        host.run(g.prompt)
    assert time.perf_counter() - t0 < 10 and server.requests == 2
    msg = str(e.value)
    assert f"download of {name} from {url} failed after 2 attempts: no data for 0.3 s" in msg
    assert f"place it at {host.dirs['annotators'] / name}" in msg
    assert not list(host.dirs["annotators"].glob(name + "*"))  # neither the file nor its .part
