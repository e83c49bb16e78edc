"""A worker's watchdog: a separate process that SIGKILLs its worker when the worker stops living.

Measured here: under load a worker process froze for good (every thread waiting on the GIL),
while livekit-server kept offering it jobs that timed out. The cause found with this watchdog's
stack dumps, a CPython 3.11 deadlock in ``sys._current_frames()``, is avoided in worker/lifecycle/server.py;
the watchdog stays as the backstop for any other freeze. A frozen process cannot notice itself,
so this small process (no shared GIL) reads the
worker's ``crosstalk_worker_heartbeat_timestamp_seconds`` from its /metrics; when that has not
moved for ``CROSSTALK_WORKER_HANG_S`` (or /metrics does not answer), it kills the worker. The
supervisor restarts it; the dispatcher retries the conversations it was running (``agent_left``).

    python -m worker.lifecycle.watchdog <worker pid> <metrics port> [hang seconds]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

HEARTBEAT = "crosstalk_worker_heartbeat_timestamp_seconds"


def metrics_host() -> str:
    """Where the worker serves /metrics (CROSSTALK_METRICS_HOST, inherited from it); found by the
    second-host test: on a host address the watchdog asked loopback, saw no answer, and killed it."""
    host = os.environ.get("CROSSTALK_METRICS_HOST", "").strip()
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def heartbeat(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{metrics_host()}:{port}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(HEARTBEAT + " "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def log(msg: str, level: str = "error", **fields: object) -> None:
    print(json.dumps({"ts": round(time.time(), 3), "level": level, "service": "worker-watchdog", "msg": msg, **fields}),
          file=sys.stderr, flush=True)


def dump(pid: int) -> None:
    """``CROSSTALK_WATCHDOG_DUMP=<dir>``: before the kill, save the frozen worker's native and Python
    stacks (gdb, py-spy; whichever is installed) there. This is how the loop-monitor deadlock in
    worker/lifecycle/server.py was found."""
    out = os.environ.get("CROSSTALK_WATCHDOG_DUMP", "").strip()
    if not out:
        return
    base = os.path.join(out, f"frozen-{pid}-{int(time.time())}")
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    cmds = {"gdb": [shutil.which("gdb"), "-p", str(pid), "-batch", "-ex", "info threads", "-ex", "thread apply all bt"],
            "py-spy": [py_spy, "dump", "--native", "--pid", str(pid)]}
    for name, cmd in cmds.items():
        if cmd[0] is None:
            continue
        try:
            os.makedirs(out, exist_ok=True)
            with open(f"{base}.{name}.txt", "w") as f:
                subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            log("cannot save the frozen worker's stacks", pid=pid, tool=name, error=str(e))
            return
    log("saved the frozen worker's stacks", pid=pid, path=base + ".*.txt", level="warning")


def alive(pid: int, was_parent: bool) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not was_parent or os.getppid() == pid  # reparented: the worker is gone


def main(argv: list[str]) -> int:
    pid, port = int(argv[0]), int(argv[1])
    hang_s = float(argv[2]) if len(argv) > 2 else 60.0
    last_ok = time.monotonic()
    was_parent = os.getppid() == pid
    while alive(pid, was_parent):
        time.sleep(2)
        beat = heartbeat(port)
        if beat is not None and time.time() - beat < hang_s:
            last_ok = time.monotonic()
            continue
        if time.monotonic() - last_ok > hang_s:
            log("worker frozen, killing it", pid=pid, silent_s=round(time.monotonic() - last_ok, 1))
            dump(pid)
            os.kill(pid, signal.SIGKILL)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
