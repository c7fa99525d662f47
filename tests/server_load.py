"""Load on the real `make run` server: a mix of valid and invalid prompts, with answer latency and memory measured.

One module for bench/bench_server_load.py (200 prompts, prints the figures) and tests/test_server_load.py (a short
run with the same checks), so both queue exactly the same prompts and judge them the same way.

What a run does (`run_load`):
  1. warm-up: one prompt of every variant (each annotator, both sampling graphs, each invalid case), queued and
     drained; then the server's resident memory is read once its worker has done its own idle `gc.collect()`
     (ComfyUI's prompt worker collects 10 s after the last prompt; we wait for that instead of forcing /free, which
     would also unload the models and make the two figures measure different states);
  2. load: `n` prompts of the mix queued at once (4 annotator : 3 sampling : 3 invalid in every 10), while a prober
     thread times GET /queue and GET /system_stats; every valid prompt must succeed and write its image, every invalid
     one must be refused (HTTP 400) or fail in the node (execution_error) with a message that names the problem;
  3. memory again, read the same way after the queue drained.
"""
from __future__ import annotations

import gc
import statistics
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil
from comfy_server import ComfyServer
from host import Graph

SIZE = 64  # pixels: image, annotator resolution and latent*8; small enough that the server, not the math, is measured
WORKER_GC_INTERVAL_S = 10.0  # ComfyUI's prompt_worker: gc.collect() this long after the last prompt finished
GAP = 10  # the mix repeats every GAP prompts
PATTERN = ("annotator", "sampling", "invalid", "annotator", "sampling", "annotator", "invalid", "sampling", "annotator", "invalid")

# Our classical annotators (no weights): node class -> widget values (resolution added below).
ANNOTATORS: dict[str, dict] = {
    "ControlNetSuiteAnnotator_canny": {"low_threshold": 100, "high_threshold": 200},
    "ControlNetSuiteAnnotator_hough_lines": {"method": "probabilistic hough", "threshold": 20, "min_line_length": 8, "max_line_gap": 4},
    "ControlNetSuiteAnnotator_lineart_standard": {"gaussian_sigma": 6.0, "intensity_threshold": 8},
    "ControlNetSuiteAnnotator_scribble_xdog": {"threshold": 32},
    "ControlNetSuiteAnnotator_tile": {"pyramid_levels": 1, "blur_sigma": 1.0},
    "ControlNetSuiteAnnotator_shuffle": {"seed": 0},
}


@dataclass(frozen=True)
class Models:
    """File names the prompts refer to, as they lie in the server's models/ folders."""

    checkpoint: str
    control_net: str
    sdxl_control_net: str  # a ControlNet of the wrong family for the checkpoint: an execution error case


def build_models(dest: Path) -> tuple[Models, dict[str, list[Path]]]:
    """The tests' tiny models (SD1.5-shaped checkpoint with TAESD, an SD1.5 and an SDXL ControlNet), for the bench.

    The test uses the session `host` fixture's files instead, which are made by the same factories."""
    from comfy_host import import_comfy

    import_comfy()  # the checkpoint's TAESD comes from comfy.taesd
    from factories import SDXL_TINY, random_controlnet, save
    from host import TINY_UNET, make_tiny_checkpoint

    dest.mkdir(parents=True, exist_ok=True)
    ckpt = make_tiny_checkpoint(dest / "tiny_sd15.safetensors")
    cn = save(dest / "cn_a.safetensors", {"control_model." + k: v * 0.5 for k, v in random_controlnet(TINY_UNET, seed=1).state_dict().items()})
    sdxl = save(dest / "cn_sdxl.safetensors", random_controlnet(SDXL_TINY, seed=3).state_dict())
    return Models(ckpt.name, cn.name, sdxl.name), {"checkpoints": [ckpt], "controlnet": [cn, sdxl]}


# -- prompts --------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One prompt and what must come of it."""

    kind: str  # "annotator", "sampling", "invalid"
    name: str  # the variant: annotator class, sampling graph, or the invalid case
    prompt: dict
    expect: str  # "success" (history success + image written), "rejected" (HTTP 400), "execution_error" (history)
    check: Optional[Callable[[dict], Optional[str]]] = None  # rejected: the 400 body; execution_error: the error message dict
    # filled in by the run
    status: int = 0
    body: object = None
    prompt_id: str = ""
    submit_s: float = 0.0
    exec_s: Optional[float] = None
    problem: Optional[str] = None


def annotator_prompt(cls: str, seed: int) -> dict:
    """Test image -> one of our classical annotators -> SaveImage; the seed varies so ComfyUI's cache never answers."""
    g = Graph()
    img = g.add("SuiteTestImage", width=SIZE, height=SIZE, channels=3, batch=1, seed=seed)
    ann = g.add(cls, image=(img, 0), resolution=SIZE, pixel_perfect=False, **ANNOTATORS[cls])
    g.add("SaveImage", images=(ann, 0), filename_prefix="load_annotator")
    return g.prompt


def sampling_prompt(m: Models, seed: int, stack: bool = False, control_net: Optional[str] = None) -> tuple[dict, dict[str, str]]:
    """Tiny checkpoint, canny hint, our loader + apply (or stack + apply stack), KSampler 1-2 steps, decode, save.

    Returns the prompt and the ids of its nodes by role, for the invalid cases to break."""
    g = Graph()
    ids: dict[str, str] = {}
    ids["ckpt"] = ckpt = g.add("CheckpointLoaderSimple", ckpt_name=m.checkpoint)
    pos = g.add("SuiteTestConditioning", seed=1, width=768)
    neg = g.add("SuiteTestConditioning", seed=2, width=768)
    ids["loader"] = cn = g.add("ControlNetSuiteLoader", control_net_name=control_net or m.control_net)
    img = g.add("SuiteTestImage", width=SIZE, height=SIZE, channels=3, batch=1, seed=seed)
    ids["hint"] = hint = g.add("ControlNetSuiteAnnotator_canny", image=(img, 0), low_threshold=100, high_threshold=200, resolution=SIZE, pixel_perfect=False)
    unit = dict(control_net=(cn, 0), image=(hint, 0), strength=0.8, start_percent=0.0, end_percent=1.0,
                control_mode=("balanced", "prompt is more important", "ControlNet is more important")[seed % 3], resize_mode="crop and resize")
    if stack:
        ids["apply"] = st = g.add("ControlNetSuiteStack", **unit)
        ap = g.add("ControlNetSuiteApplyStack", positive=(pos, 0), negative=(neg, 0), stack=(st, 0))
    else:
        ids["apply"] = ap = g.add("ControlNetSuiteApply", positive=(pos, 0), negative=(neg, 0), **unit)
    lat = g.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    ids["sampler"] = ks = g.add("KSampler", model=(ckpt, 0), seed=seed, steps=1 + seed % 2, cfg=5.0, sampler_name="euler", scheduler="normal",
                                positive=(ap, 0), negative=(ap, 1), latent_image=(lat, 0), denoise=1.0)
    dec = g.add("VAEDecode", samples=(ks, 0), vae=(ckpt, 2))
    g.add("SaveImage", images=(dec, 0), filename_prefix="load_sampling")
    return g.prompt, ids


def node_error(body: object, node: str, class_type: str, err_type: str, *words: str) -> Optional[str]:
    """None when the 400 body's node_errors blame `node` (of `class_type`) with `err_type` and a text holding `words`."""
    if not isinstance(body, dict):
        return f"body is not JSON: {body!r}"
    ne = (body.get("node_errors") or {}).get(node)
    if not ne:
        return f"node {node} ({class_type}) not named in node_errors {sorted((body.get('node_errors') or {}))}: {body.get('error')}"
    if ne.get("class_type") != class_type:
        return f"node {node} is reported as {ne.get('class_type')}, not {class_type}"
    for e in ne.get("errors", []):
        text = f"{e.get('message')} {e.get('details')}"
        if e.get("type") == err_type and all(w in text for w in words):
            return None
    return f"no {err_type} error naming {words} for node {node}: {ne.get('errors')}"


def top_error(body: object, err_type: str, *words: str) -> Optional[str]:
    """None when the 400 body's `error` has `err_type` and a message naming `words`."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or err.get("type") != err_type:
        return f"expected error type {err_type}, got {err!r}"
    text = f"{err.get('message')} {err.get('details')}"
    return None if all(w in text for w in words) else f"error does not name {words}: {text!r}"


def exec_error(msg: dict, node: str, class_type: str, *words: str) -> Optional[str]:
    """None when the history's execution_error names `node` (of `class_type`) and its message holds `words`."""
    if msg.get("node_id") != node or msg.get("node_type") != class_type:
        return f"execution_error blames node {msg.get('node_id')} ({msg.get('node_type')}), expected {node} ({class_type})"
    text = str(msg.get("exception_message", ""))
    return None if all(w.lower() in text.lower() for w in words) else f"execution_error message does not name {words}: {text!r}"


def invalid_jobs(m: Models, seed: int) -> list[Job]:
    """Every invalid case, each built from a valid prompt with one thing broken; the checks read the message content.

    Each is refused by ComfyUI's validation (HTTP 400) or by our node when it runs (execution_error)."""
    jobs = []

    p = annotator_prompt("ControlNetSuiteAnnotator_canny", seed)
    p["99"] = {"class_type": "SuiteNoSuchNode", "inputs": {}}
    jobs.append(Job("invalid", "unknown node type", p, "rejected", lambda b: top_error(b, "invalid_prompt", "SuiteNoSuchNode", "does not exist")))

    p, ids = sampling_prompt(m, seed)
    del p[ids["apply"]]["inputs"]["image"]
    a = ids["apply"]
    jobs.append(Job("invalid", "missing required input", p, "rejected", lambda b, a=a: node_error(b, a, "ControlNetSuiteApply", "required_input_missing", "image")))

    p, ids = sampling_prompt(m, seed)
    p[ids["apply"]]["inputs"]["strength"] = -5.0
    a = ids["apply"]
    jobs.append(Job("invalid", "strength -5", p, "rejected", lambda b, a=a: node_error(b, a, "ControlNetSuiteApply", "value_smaller_than_min", "-5", "strength")))

    p, ids = sampling_prompt(m, seed, stack=True)
    p[ids["apply"]]["inputs"]["end_percent"] = 1.5
    a = ids["apply"]
    jobs.append(Job("invalid", "stack end_percent 1.5", p, "rejected", lambda b, a=a: node_error(b, a, "ControlNetSuiteStack", "value_bigger_than_max", "1.5", "end_percent")))

    p, ids = sampling_prompt(m, seed, control_net="no_such_controlnet.safetensors")
    a = ids["loader"]
    jobs.append(Job("invalid", "ControlNet file missing", p, "rejected",
                    lambda b, a=a: node_error(b, a, "ControlNetSuiteLoader", "value_not_in_list", "control_net_name", "no_such_controlnet.safetensors")))

    p, ids = sampling_prompt(m, seed)
    p[ids["apply"]]["inputs"]["image"] = ["999", 0]
    a = ids["apply"]
    jobs.append(Job("invalid", "link to a missing node", p, "rejected", lambda b, a=a: node_error(b, a, "ControlNetSuiteApply", "exception_during_inner_validation", "999")))

    p = annotator_prompt("ControlNetSuiteAnnotator_canny", seed)
    p["2"]["inputs"]["resolution"] = 8
    jobs.append(Job("invalid", "annotator resolution 8", p, "rejected",
                    lambda b: node_error(b, "2", "ControlNetSuiteAnnotator_canny", "value_smaller_than_min", "8", "resolution")))

    p, ids = sampling_prompt(m, seed)
    p[ids["apply"]]["inputs"].update(start_percent=0.8, end_percent=0.2)
    a = ids["apply"]
    jobs.append(Job("invalid", "start after end", p, "execution_error",
                    lambda e, a=a: exec_error(e, a, "ControlNetSuiteApply", "start_percent 0.8", "end_percent 0.2")))

    p, ids = sampling_prompt(m, seed, control_net=m.sdxl_control_net)
    s = ids["sampler"]
    jobs.append(Job("invalid", "SDXL ControlNet on SD1.5", p, "execution_error", lambda e, s=s: exec_error(e, s, "KSampler", "SDXL", "SD1")))

    # NaN passes ComfyUI's min/max checks (every comparison with NaN is false): our nodes refuse it themselves
    p, ids = sampling_prompt(m, seed)
    p[ids["apply"]]["inputs"]["start_percent"] = float("nan")
    a = ids["apply"]
    jobs.append(Job("invalid", "start_percent NaN", p, "execution_error", lambda e, a=a: exec_error(e, a, "ControlNetSuiteApply", "start_percent is nan")))

    p = annotator_prompt("ControlNetSuiteAnnotator_lineart_standard", seed)
    p["2"]["inputs"]["gaussian_sigma"] = float("nan")
    jobs.append(Job("invalid", "annotator sigma NaN", p, "execution_error",
                    lambda e: exec_error(e, "2", "ControlNetSuiteAnnotator_lineart_standard", "gaussian_sigma is nan")))
    return jobs


def warmup_jobs(m: Models, seed: int = 10_000) -> list[Job]:
    """One prompt of every variant: every code path has run (and allocated) once before memory is read."""
    jobs = [Job("annotator", cls, annotator_prompt(cls, seed + i), "success") for i, cls in enumerate(ANNOTATORS)]
    jobs += [Job("sampling", name, sampling_prompt(m, seed + i, stack=stack)[0], "success") for i, (name, stack) in enumerate((("apply", False), ("stack", True)))]
    return jobs + invalid_jobs(m, seed)


def mixed_jobs(m: Models, n: int, seed: int = 0) -> list[Job]:
    """n prompts, PATTERN repeated: each kind cycles through its variants, every prompt with its own seed."""
    count = {"annotator": 0, "sampling": 0, "invalid": 0}
    annotators = list(ANNOTATORS)
    jobs = []
    for i in range(n):
        kind = PATTERN[i % GAP]
        k = count[kind]
        count[kind] += 1
        if kind == "annotator":
            cls = annotators[k % len(annotators)]
            jobs.append(Job(kind, cls, annotator_prompt(cls, seed + i), "success"))
        elif kind == "sampling":
            stack = k % 2 == 1
            jobs.append(Job(kind, "stack" if stack else "apply", sampling_prompt(m, seed + i, stack=stack)[0], "success"))
        else:
            cases = invalid_jobs(m, seed + i)
            jobs.append(cases[k % len(cases)])
    return jobs


# -- running ----------------------------------------------------------------------------------------------------------

class Prober(threading.Thread):
    """Times GET /queue and GET /system_stats alternately while the queue runs: does the server still answer?"""

    PATHS = ("/queue", "/system_stats")

    def __init__(self, server: ComfyServer, interval_s: float = 0.2, timeout_s: float = 30.0):
        super().__init__(daemon=True)
        self.server, self.interval_s, self.timeout_s = server, interval_s, timeout_s
        self.latencies: dict[str, list[float]] = {p: [] for p in self.PATHS}
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_event.is_set():
            path = self.PATHS[i % len(self.PATHS)]
            i += 1
            t0 = time.perf_counter()
            try:
                self.server.get(path, timeout=self.timeout_s)
                self.latencies[path].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - any failure to answer is the finding
                self.errors.append(f"GET {path}: {type(e).__name__}: {e}")
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    @property
    def all(self) -> list[float]:
        return [x for v in self.latencies.values() for x in v]


def server_process(server: ComfyServer) -> psutil.Process:
    """The server's python process: run_comfyui.sh execs main.py, so it is the started pid (checked)."""
    proc = psutil.Process(server.proc.pid)
    for p in [proc] + proc.children(recursive=True):
        if any(a.endswith("main.py") for a in p.cmdline()):
            return p
    raise AssertionError(f"no ComfyUI main.py process under pid {proc.pid}: {proc.cmdline()}")


def settled_rss(server: ComfyServer, drained_at: float, samples: int = 3) -> int:
    """RSS in bytes once the idle worker has run its gc.collect() (WORKER_GC_INTERVAL_S after the last prompt),
    the median of a few readings half a second apart."""
    time.sleep(max(0.0, drained_at + WORKER_GC_INTERVAL_S + 1.0 - time.time()))
    proc = server_process(server)
    readings = []
    for _ in range(samples):
        readings.append(proc.memory_info().rss)
        time.sleep(0.5)
    return int(statistics.median(readings))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def submit(server: ComfyServer, jobs: list[Job]) -> None:
    for j in jobs:
        t0 = time.perf_counter()
        j.status, j.body = server.post("/prompt", {"prompt": j.prompt, "client_id": "load"})
        j.submit_s = time.perf_counter() - t0
        if j.status == 200 and isinstance(j.body, dict):
            j.prompt_id = j.body.get("prompt_id", "")


def drain(server: ComfyServer, timeout_s: float) -> float:
    """Waits until nothing runs or waits in the queue; returns the time it was empty."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        q = server.get("/queue")
        if not q.get("queue_running") and not q.get("queue_pending"):
            return time.time()
        time.sleep(0.25)
    raise AssertionError(f"queue did not drain within {timeout_s:.0f} s:\n" + server.log()[-4000:])


def judge(server: ComfyServer, jobs: list[Job]) -> None:
    """Sets each job's problem (None = as expected) and its execution time from the history's timestamps."""
    history = server.get("/history?max_items=100000")
    for j in jobs:
        if j.expect == "rejected":
            if j.status != 400:
                j.problem = f"expected HTTP 400, got {j.status}: {str(j.body)[:300]}"
            elif j.check:
                j.problem = j.check(j.body)
            continue
        if j.status != 200 or not j.prompt_id:
            j.problem = f"refused ({j.status}): {str(j.body)[:500]}"
            continue
        entry = history.get(j.prompt_id)
        if entry is None:
            j.problem = "no history entry"
            continue
        msgs = {name: data for name, data in entry.get("status", {}).get("messages", [])}
        if "execution_start" in msgs and ("execution_success" in msgs or "execution_error" in msgs):
            end = msgs.get("execution_success") or msgs.get("execution_error")
            j.exec_s = (end["timestamp"] - msgs["execution_start"]["timestamp"]) / 1000
        status = entry.get("status", {}).get("status_str")
        if j.expect == "execution_error":
            if status != "error" or "execution_error" not in msgs:
                j.problem = f"expected an execution_error, got status {status}"
            elif j.check:
                j.problem = j.check(msgs["execution_error"])
            continue
        if status != "success":
            err = msgs.get("execution_error", {})
            j.problem = f"status {status}: {err.get('node_type')} {err.get('exception_message')}"
            continue
        images = [i for out in entry.get("outputs", {}).values() for i in out.get("images", [])]
        if len(images) != 1:
            j.problem = f"expected one image in the outputs, got {images}"
            continue
        path = server.run_dir / "output" / images[0].get("subfolder", "") / images[0]["filename"]
        if not path.is_file():
            j.problem = f"image {path} not written"
        elif png_size(path) != (SIZE, SIZE):
            j.problem = f"image {path.name} is {png_size(path)}, expected {(SIZE, SIZE)}"


@dataclass
class LoadReport:
    warmup: list[Job]
    load: list[Job]
    wall_s: float  # first submission of the load phase to the drained queue
    latencies: dict[str, list[float]]  # path -> seconds, during the load phase
    probe_errors: list[str]
    rss_warm: int
    rss_after: int

    @property
    def problems(self) -> list[str]:
        return [f"{j.kind}/{j.name}: {j.problem}" for j in self.warmup + self.load if j.problem]

    @property
    def rss_ratio(self) -> float:
        return self.rss_after / self.rss_warm

    def latency_stats(self) -> dict[str, float]:
        xs = sorted(x for v in self.latencies.values() for x in v)
        if not xs:
            return {"n": 0, "p50": float("nan"), "p95": float("nan"), "max": float("nan")}
        return {"n": len(xs), "p50": xs[len(xs) // 2], "p95": xs[min(len(xs) - 1, int(0.95 * len(xs)))], "max": xs[-1]}

    def per_kind(self) -> dict[str, dict[str, float]]:
        """Per kind: count, how many behaved as expected, prompts/s of execution (history timestamps, valid and
        execution-error prompts) or of refusal (POST round trip, rejected prompts)."""
        out = {}
        for kind in ("annotator", "sampling", "invalid"):
            js = [j for j in self.load if j.kind == kind]
            exec_s = sum(j.exec_s for j in js if j.exec_s is not None)
            n_exec = sum(1 for j in js if j.exec_s is not None)
            rejected = [j for j in js if j.expect == "rejected"]
            out[kind] = {"n": len(js), "ok": sum(1 for j in js if not j.problem),
                         "exec_per_s": n_exec / exec_s if exec_s else float("nan"), "n_exec": n_exec,
                         "submit_ms_median": 1000 * statistics.median(j.submit_s for j in js) if js else float("nan"),
                         "reject_per_s": len(rejected) / sum(j.submit_s for j in rejected) if rejected else float("nan")}
        return out


def run_load(server: ComfyServer, models: Models, n: int, drain_timeout_s: float = 900, probe_interval_s: float = 0.2) -> LoadReport:
    """Warm-up, memory, n mixed prompts under the prober, memory again (see the module docstring)."""
    warm = warmup_jobs(models)
    submit(server, warm)
    drained = drain(server, drain_timeout_s)
    judge(server, warm)
    gc.collect()  # ours, so the client's garbage never runs during the measurement
    rss_warm = settled_rss(server, drained)

    jobs = mixed_jobs(models, n)
    prober = Prober(server, interval_s=probe_interval_s)
    prober.start()
    t0 = time.time()
    submit(server, jobs)
    try:
        drained = drain(server, drain_timeout_s)
    finally:
        prober.stop()
    wall = drained - t0
    judge(server, jobs)
    rss_after = settled_rss(server, drained)

    return LoadReport(warm, jobs, wall, prober.latencies, prober.errors, rss_warm, rss_after)
