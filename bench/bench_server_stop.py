"""How long `make run`'s server (scripts/run_comfyui.sh) takes from Ctrl+C (SIGINT to its process group) to exit.

For each host and condition the server is started as tests/comfy_server.py starts it (its own run folder, the tests'
tiny SD1.5-shaped checkpoint and a tiny ControlNet, the test nodes linked in), brought to the condition, sent SIGINT,
and timed until the process is gone. Conditions:

Each run twice: `direct` (the host's main.py as it is, CNS_LAUNCHER=0) and `ours` (scripts/comfy_main.py, what
`make run` uses); a run is clean when the exit status is 0, the host logged "Stopped server", and there was neither
an abort ("terminate called ...") nor a forced exit.

    idle          listening, nothing run yet
    after-prompt  a 2-step sampling prompt with our nodes ran to the end (the model stays loaded), then SIGINT
    during-prompt SIGINT while a long sampling prompt executes in ComfyUI's prompt worker thread
    startup-*     SIGINT before the server listens: 'bash' (0.3 s after launch: the script's set-up and its
                  torch.cuda probe), 'imports' (0.5 s after the script's banner: main.py importing torch and ComfyUI),
                  'nodes' (3 s after the banner: ComfyUI loading its nodes and ours), 'listen' (the moment
                  "Starting server" is logged)

--load N runs N busy-loop processes beside the server (the machine "loaded"). Per run it prints the seconds from SIGINT
to exit, the seconds to the host's "Stopped server" line, and whether the stop was clean (the log shows the host's
"Stopped server" and no forced exit); a server still alive after --dump-after seconds gets its stacks dumped with
py-spy (`--native` too) into --out, and after --hang seconds it is killed and reported as a hang.

    .venv/bin/python bench/bench_server_stop.py [--hosts 0.3.75,a28a9dc] [--conditions idle,after-prompt,...]
        [--reps 3] [--load 0] [--out /tmp/server_stop]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from comfy_server import ComfyServer, sampling_prompt  # noqa: E402
from common import machine  # noqa: E402

CONDITIONS = ("idle", "after-prompt", "during-prompt", "startup-bash", "startup-imports", "startup-nodes", "startup-listen")
PY_SPY = shutil.which("py-spy") or "/tmp/tools/bin/py-spy"


def make_models(dest: Path) -> None:
    """The tests' tiny checkpoint and ControlNet, built with the host that CNS_HOST names (run in a subprocess)."""
    from comfy_host import import_comfy

    import_comfy()
    from factories import random_controlnet, save
    from host import TINY_UNET, make_tiny_checkpoint

    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    (dest / "controlnet").mkdir(parents=True, exist_ok=True)
    make_tiny_checkpoint(dest / "checkpoints" / "tiny_sd15.safetensors")
    save(dest / "controlnet" / "cn_a.safetensors", {"control_model." + k: v * 0.5 for k, v in random_controlnet(TINY_UNET, seed=1).state_dict().items()})


def wait_log(srv: ComfyServer, text: str, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and srv.proc.poll() is None:
        if text in srv.log():
            return True
        time.sleep(0.02)
    return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def one_run(host: str, condition: str, launcher: str, models: Path, work: Path, args) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{host}-{condition}-{launcher}-", dir=work))
    srv = ComfyServer(run_dir, models={"checkpoints": [models / "checkpoints" / "tiny_sd15.safetensors"],
                                       "controlnet": [models / "controlnet" / "cn_a.safetensors"]},
                      extra_env={"CNS_HOST": host, "CNS_LAUNCHER": "1" if launcher == "ours" else "0", **({"CNS_STOP_GRACE": str(args.grace)} if args.grace is not None else {})})
    reached = True
    if condition.startswith("startup-"):
        srv._log = open(srv.log_path, "w")
        srv.proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run_comfyui.sh")], cwd=ROOT, env=srv.env, stdout=srv._log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        phase = condition.split("-", 1)[1]
        if phase == "bash":
            time.sleep(0.3)
        elif phase in ("imports", "nodes"):
            reached = wait_log(srv, "ControlNet Suite: ComfyUI from")
            time.sleep(0.5 if phase == "imports" else 3.0)
        elif phase == "listen":
            reached = wait_log(srv, "Starting server")
        reached = reached and srv.proc.poll() is None and not listening(srv.port) if phase != "listen" else reached
    else:
        srv.start()
        if condition == "after-prompt":
            entry = srv.wait(srv.queue(sampling_prompt("tiny_sd15.safetensors", 2, prefix="stop_bench")))
            assert entry["status"]["status_str"] == "success", entry["status"]
            time.sleep(0.5)
        elif condition == "during-prompt":
            srv.queue(sampling_prompt("tiny_sd15.safetensors", args.long_steps, prefix="stop_bench"))
            deadline = time.time() + 120
            while time.time() < deadline and not srv.get("/queue")["queue_running"]:
                time.sleep(0.05)
            wait_log(srv, "it/s]", timeout=120) or wait_log(srv, "s/it]", timeout=1)  # the sampler's progress bar is moving
            time.sleep(0.5)
        else:
            time.sleep(0.5)
    cpu0 = cpu_seconds(srv.proc.pid)
    t0 = time.perf_counter()
    srv.interrupt()
    stopped_at = None
    dumped = None
    while not exited(srv.proc.pid) and time.perf_counter() - t0 < args.hang:
        if stopped_at is None and "Stopped server" in srv.log():
            stopped_at = time.perf_counter() - t0
        if dumped is None and time.perf_counter() - t0 > args.dump_after:
            dumped = run_dir / "py-spy.txt"
            pid = server_pid(srv.proc.pid)
            with open(dumped, "w") as f:
                f.write(f"# {host} {condition}: alive {time.perf_counter() - t0:.1f} s after SIGINT; pid {pid}\n")
                f.flush()
                for extra in ([], ["--native"]):
                    subprocess.run([PY_SPY, "dump", "--pid", str(pid), *extra], stdout=f, stderr=subprocess.STDOUT, timeout=60)
        time.sleep(0.01)
    exit_s = time.perf_counter() - t0
    cpu = cpu_seconds(srv.proc.pid) - cpu0  # still a zombie here: its CPU time is readable
    hung = srv.proc.poll() is None
    srv.kill()
    log = srv.log()
    if stopped_at is None and "Stopped server" in log:
        stopped_at = exit_s
    return {"host": host, "condition": condition, "launcher": launcher, "load": args.load, "exit_s": None if hung else exit_s, "cpu_s": cpu, "stopped_s": stopped_at,
            "rc": srv.proc.returncode, "reached": reached,
            "clean": srv.proc.returncode == 0 and "Stopped server" in log and "forcing exit" not in log and "terminate called" not in log,
            "forced": "forcing exit" in log, "dump": str(dumped) if dumped else None, "log": str(srv.log_path)}


def exited(pid: int) -> bool:
    """Whether the process has ended, without reaping it (so that its CPU time can still be read)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process and of its children it has waited for (fields 14-17 of its stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def server_pid(pid: int) -> int:
    """The python process under the run script (it execs; a launcher of ours may sit in between)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(kids[-1]) if kids else pid
    except OSError:
        return pid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="0.3.75,a28a9dc")
    ap.add_argument("--conditions", default="idle,after-prompt,during-prompt,startup-bash,startup-imports,startup-nodes,startup-listen")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--launchers", default="direct,ours", help="direct: the host's main.py as it is; ours: scripts/comfy_main.py")
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes running beside the server")
    ap.add_argument("--long-steps", type=int, default=2000, help="sampling steps of the during-prompt prompt")
    ap.add_argument("--dump-after", type=float, default=10.0)
    ap.add_argument("--hang", type=float, default=90.0)
    ap.add_argument("--grace", type=float, default=None, help="CNS_STOP_GRACE for the server (default: the script's)")
    ap.add_argument("--out", default=None, help="folder for the run folders, logs and py-spy dumps (kept)")
    ap.add_argument("--json", default=None, help="append one JSON line per run to this file")
    args = ap.parse_args()
    conditions = args.conditions.split(",")
    for c in conditions:
        if c not in CONDITIONS:
            raise SystemExit(f"unknown condition {c}; use {', '.join(CONDITIONS)}")
    work = Path(args.out or tempfile.mkdtemp(prefix="server_stop-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {machine()}; load average {os.getloadavg()[0]:.2f}; "
          f"{args.load} busy-loop processes beside the server; runs in {work}")
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.load)]
    try:
        for host in args.hosts.split(","):
            models = work / f"models-{host}"
            if not (models / "controlnet" / "cn_a.safetensors").exists():
                subprocess.run([sys.executable, __file__, "--make-models-into", str(models)], check=True, env=dict(os.environ, CNS_HOST=host),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for cond in conditions:
                medians = {}
                for launcher in args.launchers.split(","):
                    runs = []
                    for _ in range(args.reps):
                        r = one_run(host, cond, launcher, models, work, args)
                        runs.append(r)
                        if args.json:
                            with open(args.json, "a") as f:
                                f.write(json.dumps(r) + "\n")
                        ex = "HANG" if r["exit_s"] is None else f"{r['exit_s']:6.2f} s"
                        st = "-" if r["stopped_s"] is None else f"{r['stopped_s']:.2f} s"
                        print(f"  {host:8s} {cond:16s} {launcher:6s} exit {ex}  cpu {r['cpu_s']:5.2f} s  'Stopped server' {st}  rc {r['rc']}  "
                              f"clean {r['clean']}  forced {r['forced']}{'' if r['reached'] else '  (phase not reached)'}"
                              f"{'  dump ' + r['dump'] if r['dump'] else ''}", flush=True)
                    done = [r["exit_s"] for r in runs if r["exit_s"] is not None]
                    medians[launcher] = statistics.median(done) if done else float("nan")
                    print(f"{host:8s} {cond:16s} {launcher:6s} load {args.load}: median {medians[launcher]:6.2f} s  "
                          f"max {max(done) if done else float('nan'):6.2f} s  hangs {len(runs) - len(done)}/{len(runs)}  "
                          f"clean {sum(r['clean'] for r in runs)}/{len(runs)}", flush=True)
                if {"ours", "direct"} <= medians.keys():
                    print(f"{host:8s} {cond:16s} ours/direct time to exit: {medians['ours'] / medians['direct']:.2f}x", flush=True)
    finally:
        for b in burners:
            b.kill()
            b.wait()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-models-into":
        make_models(Path(sys.argv[2]))
    else:
        main()
