"""Load on the real `make run` server (loopback): 200 mixed prompts queued at once after a warm-up.

Mix (tests/server_load.py, shared with tests/test_server_load.py): in every 10 prompts, 4 annotator-only prompts (our
classical annotators on a 64 px test image -> SaveImage), 3 tiny sampling prompts (tiny SD1.5-shaped checkpoint,
canny hint, our loader + apply or stack, KSampler 1-2 steps at 64 px -> SaveImage) and 3 invalid prompts (unknown
node, missing input, out-of-range widgets, missing ControlNet file, link to a missing node: HTTP 400; start after end,
a wrong-family ControlNet and NaN widget values: execution_error), each checked for the message naming the problem.

Prints prompts/s per kind, the error checks, GET /queue + /system_stats latency during the load, and the server's
resident memory after the warm-up (one prompt of every variant) and after the load, both read once the queue has
drained and the worker's own idle gc.collect() has run. Exits 1 when a check fails.

    .venv/bin/python bench/bench_server_load.py [--n 200]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import machine  # also puts tests/ on sys.path

MIB = 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="prompts in the load phase (after the warm-up)")
    args = ap.parse_args()
    from comfy_server import ComfyServer
    from server_load import build_models, run_load

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        models, files = build_models(Path(d) / "models")
        t0 = time.perf_counter()
        with ComfyServer(Path(d) / "run", models=files).start() as srv:
            print(f"server up in {time.perf_counter() - t0:.1f} s (make run -> scripts/run_comfyui.sh, port {srv.port})")
            r = run_load(srv, models, args.n)

    print(f"\nwarm-up: {len(r.warmup)} prompts (one of every variant); load: {len(r.load)} prompts queued at once, "
          f"drained in {r.wall_s:.1f} s ({len(r.load) / r.wall_s:.2f} prompts/s overall)")
    print(f"{'kind':<10} {'n':>4} {'as expected':>12} {'executed/s':>11} {'refused/s':>10} {'POST /prompt median':>20}")
    for kind, s in r.per_kind().items():
        print(f"{kind:<10} {s['n']:>4} {s['ok']:>12} {s['exec_per_s']:>11.2f} {s['reject_per_s']:>10.1f} {s['submit_ms_median']:>17.1f} ms")
    print("(executed/s: prompts over their summed execution time from the history's timestamps; refused/s: over the summed POST round trips)")

    invalid = [j for j in r.warmup + r.load if j.kind == "invalid"]
    cases, ok = Counter(j.name for j in invalid), Counter(j.name for j in invalid if not j.problem)
    print("\nerror checks (warm-up + load):")
    for j in {j.name: j for j in invalid}.values():
        how = "HTTP 400" if j.expect == "rejected" else "execution_error"
        print(f"  {j.name:<28} {how:<16} {ok[j.name]}/{cases[j.name]} named the problem")

    lat = r.latency_stats()
    print(f"\nanswer latency during the load, GET /queue + /system_stats every 0.2 s: n={lat['n']} p50 {lat['p50'] * 1000:.1f} ms, "
          f"p95 {lat['p95'] * 1000:.1f} ms, max {lat['max'] * 1000:.1f} ms; unanswered: {len(r.probe_errors)}")
    for path, xs in r.latencies.items():
        xs = sorted(xs)
        if xs:
            print(f"  {path:<14} n={len(xs)} p50 {xs[len(xs) // 2] * 1000:.1f} ms, max {xs[-1] * 1000:.1f} ms")

    print(f"\nserver RSS (psutil, python main.py): after warm-up {r.rss_warm / MIB:.1f} MiB, after the load {r.rss_after / MIB:.1f} MiB, "
          f"ratio {r.rss_ratio:.4f} ({'within' if r.rss_ratio <= 1.05 else 'OVER'} the 5% bound)")

    failures = r.problems + r.probe_errors
    for f in failures:
        print(f"FAILED: {f}")
    print(f"\n{'all checks passed' if not failures else f'{len(failures)} checks failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
