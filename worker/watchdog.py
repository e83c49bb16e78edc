"""A worker's watchdog: a separate process that SIGKILLs its worker when the worker stops living.

Measured here: under load a worker process can freeze for good (every thread waiting on the GIL
around livekit-rtc's FFI callback thread), while livekit-server keeps offering it jobs that time
out. A frozen process cannot notice itself, so this small process (no shared GIL) reads the
worker's ``crosstalk_worker_heartbeat_timestamp_seconds`` from its /metrics; when that has not
moved for ``CROSSTALK_WORKER_HANG_S`` (or /metrics does not answer), it kills the worker. The
supervisor restarts it; the dispatcher retries the conversations it was running (``agent_left``).

    python -m worker.watchdog <worker pid> <metrics port> [hang seconds]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request

HEARTBEAT = "crosstalk_worker_heartbeat_timestamp_seconds"


def heartbeat(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(HEARTBEAT + " "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


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
            print(json.dumps({"ts": round(time.time(), 3), "level": "error", "service": "worker-watchdog",
                              "msg": "worker frozen, killing it", "pid": pid, "silent_s": round(time.monotonic() - last_ok, 1)}),
                  file=sys.stderr, flush=True)
            os.kill(pid, signal.SIGKILL)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
