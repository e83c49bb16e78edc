"""Run the real stack (`just up` / `just down`) for tests, isolated from any other stack.

Every port is a free one and the run/data dirs are in a temp dir, so a test's
stack never collides with a developer's `just up` or with another test. Use::

    with running_stack(tmp_path) as stack:          # every program `just up` starts
        ... stack.nats_url, stack.livekit_url, stack.data_dir ...

``CROSSTALK_SERVICES`` (e.g. ``"nats,livekit"``) narrows what starts. Whatever
happens, the context manager leaves no process of the stack behind.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from servers import _ephemeral_range, free_ports  # noqa: E402  (tests/servers.py owns port picking)

JUST = Path(sys.executable).parent / "just"
TAG = "CROSSTALK_STACK"  # infra/stack.py tags every process of a stack with its run dir

# Variables of the calling shell that would point the stack elsewhere.
_INHERITED_OUT = ("NATS_URL", "LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")

PORT_VARS = (
    "CROSSTALK_NATS_PORT", "CROSSTALK_NATS_MONITOR_PORT",
    "CROSSTALK_LIVEKIT_PORT", "CROSSTALK_LIVEKIT_TCP_PORT", "CROSSTALK_LIVEKIT_METRICS_PORT",
    "CROSSTALK_MODEL_PORT", "CROSSTALK_PROMETHEUS_PORT", "CROSSTALK_GRAFANA_PORT",
    "CROSSTALK_DISPATCHER_METRICS_PORT", "CROSSTALK_ALLOCATOR_METRICS_PORT", "CROSSTALK_SINK_METRICS_PORT",
    "CROSSTALK_MODEL_METRICS_PORT", "CROSSTALK_WORKER_METRICS_PORT",
    "CROSSTALK_WEBHOOK_PORT", "CROSSTALK_WEBHOOK_METRICS_PORT",
)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]

    @classmethod
    def create(cls, tmp: Path, **overrides: str) -> Stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSTALK_") and k not in _INHERITED_OUT}
        lo, hi = _ephemeral_range()
        udp = random.choice([p for p in range(15000, 64900, 100) if p + 99 < lo or p > hi])
        env["CROSSTALK_LIVEKIT_UDP_PORTS"] = f"{udp}-{udp + 99}"
        ports = free_ports(len(PORT_VARS), avoid=set(range(udp, udp + 100)))
        env.update(zip(PORT_VARS, map(str, ports), strict=True))
        env["CROSSTALK_RUN_DIR"] = str(tmp / "run")
        env["CROSSTALK_DATA_DIR"] = str(tmp / "data")
        # one worker process (its metrics on the one port picked above), not one sized to the machine
        env["CROSSTALK_WORKERS"] = "1"
        env.update(overrides)
        return cls(tmp, env)

    @property
    def run_dir(self) -> Path:
        return Path(self.env["CROSSTALK_RUN_DIR"])

    @property
    def data_dir(self) -> Path:
        return Path(self.env["CROSSTALK_DATA_DIR"])

    @property
    def nats_url(self) -> str:
        return self.env.get("NATS_URL") or f"nats://127.0.0.1:{self.env['CROSSTALK_NATS_PORT']}"

    @property
    def livekit_url(self) -> str:
        return self.env.get("LIVEKIT_URL") or f"ws://127.0.0.1:{self.env['CROSSTALK_LIVEKIT_PORT']}"

    def ports(self) -> list[int]:
        return [int(self.env[v]) for v in PORT_VARS]

    def just(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(JUST), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def up(self) -> subprocess.CompletedProcess[str]:
        res = self.just("up")
        if res.returncode != 0:
            raise AssertionError(f"just up failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def supervisor(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.run_dir / 'supervisor.sock'}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def pids(self) -> dict[str, int]:
        """supervisord's pid and each program's, by name."""
        sup = self.supervisor()
        return {"supervisord": int(sup.getPID()), **{i["name"]: int(i["pid"]) for i in sup.getAllProcessInfo()}}

    def processes(self) -> list[psutil.Process]:
        """Live processes that belong to this stack."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TAG) == str(self.run_dir):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def dump_logs(self, lines: int = 40) -> None:
        """Print the end of every program's log (pytest shows it with the failure)."""
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {log.name} (last {len(tail)} lines)", *tail, sep="\n")

    def cleanup(self) -> None:
        """`just down`, then kill anything of this stack that survived (a test must leave nothing running)."""
        if self.processes():
            self.just("down", timeout=180)
        left = self.processes()
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)


@contextmanager
def running_stack(tmp: Path, **overrides: str) -> Iterator[Stack]:
    stack = Stack.create(tmp, **overrides)
    try:
        stack.up()
        yield stack
    except BaseException:
        stack.dump_logs()
        raise
    finally:
        stack.cleanup()
