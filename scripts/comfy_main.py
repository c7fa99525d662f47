"""Runs a ComfyUI host's main.py exactly as `python main.py ARGS` would, so that Ctrl+C stops it promptly and cleanly.

    python scripts/comfy_main.py COMFYUI_DIR [main.py arguments ...]

Why a launcher: measured with bench/bench_server_stop.py, the host's own Ctrl+C handling has two faults that we
cannot fix inside the host (we never edit host files):
  * Ctrl+C during a prompt ends the main thread while the prompt worker thread is still inside torch. The interpreter
    then tears itself down under that thread and the process dies with "terminate called without an active
    exception" (SIGABRT, exit -6) instead of a clean exit: whatever the prompt was writing is cut off.
  * An idle server takes 1.8-2.5 s of CPU after "Stopped server" to unload its modules (torch and the host's), which
    grows with a busy machine and is wasted: the process is about to exit anyway.
So, on the first Ctrl+C: the host's own interrupt (the Cancel button's) stops the running prompt at its next step,
pending prompts are dropped (they are in memory only, as on any stop), and the host's own KeyboardInterrupt path
logs "Stopped server" and cleans up. Then this launcher waits until the worker has left the interrupted prompt,
runs the exit handlers, joins non-daemon threads and ends the process without the module teardown.
A watchdog ends the process after CNS_STOP_GRACE seconds (default 30) if any of that hangs, and says so; a second
Ctrl+C ends it at once.
"""
from __future__ import annotations

import atexit
import logging
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("controlnet_suite.stop")
GRACE_S = float(os.environ.get("CNS_STOP_GRACE", "30"))


def prompt_queue():
    """The host's PromptQueue, once its server exists (main.py imports the module `server`)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    return getattr(instance, "prompt_queue", None)


def running_prompts() -> int:
    queue = prompt_queue()
    return len(getattr(queue, "currently_running", None) or {})


def say(message: str) -> None:
    """The host logs through the root logger; before its set-up (start-up), stderr."""
    if logging.getLogger().handlers:
        logging.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def force_exit(code: int, why: str) -> None:
    say(f"ControlNet Suite: {why}; forcing exit")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stopper() -> None:
    """Off the main thread (a signal handler must not take the queue's lock the main thread may hold): stop the
    running prompt, drop the pending ones, and end the process if the stop takes longer than the grace period."""
    model_management = sys.modules.get("comfy.model_management")
    if model_management is not None and running_prompts():
        model_management.interrupt_current_processing(True)
    queue = prompt_queue()
    if queue is not None:
        queue.wipe_queue()
    time.sleep(GRACE_S)
    force_exit(1, f"the server had not stopped {GRACE_S:.0f} s after Ctrl+C")


def on_sigint(signum, frame) -> None:
    signal.signal(signal.SIGINT, lambda *_: force_exit(130, "second Ctrl+C"))
    threading.Thread(target=stopper, name="cns-stopper", daemon=True).start()
    raise KeyboardInterrupt  # what Python's default handler does: the host's own `except KeyboardInterrupt` runs


def finish(code: int) -> None:
    """Exit without the interpreter's module teardown, once no prompt runs; exit handlers and non-daemon threads
    are honoured as a normal exit would."""
    deadline = time.monotonic() + GRACE_S
    while running_prompts() and time.monotonic() < deadline:
        time.sleep(0.05)
    if running_prompts():
        force_exit(1, f"a prompt was still running {GRACE_S:.0f} s after Ctrl+C")
    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, as interpreter exit does
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    if len(sys.argv) < 2 or not (Path(sys.argv[1]) / "main.py").is_file():
        sys.exit("usage: comfy_main.py COMFYUI_DIR [main.py arguments ...]: COMFYUI_DIR must hold ComfyUI's main.py")
    host = Path(sys.argv[1]).resolve()
    script = host / "main.py"
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0] = str(host)  # as `python main.py` puts the script's folder first
    os.chdir(host)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except KeyboardInterrupt:  # Ctrl+C before the server was up: the host has no handler for it there
        say("ControlNet Suite: stopped during start-up")
        finish(130)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        finish(code)
    finish(0)


if __name__ == "__main__":
    main()
