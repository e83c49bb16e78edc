"""The worker watchdog kills a process whose heartbeat stops, and leaves a beating one alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_watchdog_kills_a_frozen_worker_and_spares_a_live_one(tmp_path: Path) -> None:
    # a stand-in "worker": a process whose heartbeat we control through a metrics file it serves
    port = free_port()
    script = f"""
import time, sys
from prometheus_client import CollectorRegistry, Gauge, start_http_server
reg = CollectorRegistry()
g = Gauge("crosstalk_worker_heartbeat_timestamp_seconds", "hb", registry=reg)
start_http_server({port}, addr="127.0.0.1", registry=reg)
frozen_after = float(sys.argv[1])
start = time.time()
while True:
    if time.time() - start < frozen_after:
        g.set(time.time())
    time.sleep(0.2)
"""
    live = subprocess.Popen([sys.executable, "-c", script, "1000"])
    try:
        time.sleep(1.5)
        dog = subprocess.Popen([sys.executable, "-m", "worker.lifecycle.watchdog", str(live.pid), str(port), "5"], cwd=ROOT)
        time.sleep(8)
        assert live.poll() is None, "a worker with a fresh heartbeat is left alone"
        dog.terminate()
        dog.wait(5)
    finally:
        live.kill()
        live.wait(5)

    port2 = free_port()
    frozen = subprocess.Popen([sys.executable, "-c", script.replace(str(port), str(port2)), "1"])
    try:
        time.sleep(1.5)
        dumps = tmp_path / "dumps"
        dog = subprocess.Popen([sys.executable, "-m", "worker.lifecycle.watchdog", str(frozen.pid), str(port2), "5"], cwd=ROOT,
                               stderr=subprocess.PIPE, env={**os.environ, "CROSSTALK_WATCHDOG_DUMP": str(dumps)})
        frozen.wait(300)  # the watchdog saves its stacks, then SIGKILLs it once the heartbeat is 5 s old
        assert frozen.returncode == -9
        _, err = dog.communicate(timeout=10)
        assert dog.returncode == 1 and b"worker frozen" in err
        # the stacks of the frozen process, from whichever of gdb / py-spy this machine has
        tools = {"gdb": shutil.which("gdb"),
                 "py-spy": shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")}
        for tool, path in tools.items():
            saved = list(dumps.glob(f"frozen-{frozen.pid}-*.{tool}.txt"))
            assert bool(saved) == bool(path), (tool, saved)
            if saved:
                assert "sleep" in saved[0].read_text()  # the stand-in worker sits in time.sleep
    finally:
        if frozen.poll() is None:
            frozen.kill()
            frozen.wait(5)

