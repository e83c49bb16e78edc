"""Start real nats-server and livekit-server processes for tests and benchmarks.

Used by tests/conftest.py (once per test session, free ports, a temp dir). Every free port a
test or benchmark picks comes from :func:`free_ports` (outside the kernel's ephemeral range).
Set CROSSTALK_TEST_NATS_URL / CROSSTALK_TEST_LIVEKIT_URL to use running servers instead.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int, avoid: set[int] | None = None) -> list[int]:
    """``n`` distinct free ports outside the kernel's ephemeral range.

    An OS-assigned port (bind to 0) is ephemeral: any outgoing connection may take
    it before the server binds it (livekit-server binds its RTC TCP port on all
    interfaces, where that collides). Ports below/above that range never go to clients.
    """
    lo, hi = _ephemeral_range()
    pool = [p for p in range(15000, 65000) if not lo <= p <= hi and p not in (avoid or set())]
    chosen: list[int] = []
    for port in random.sample(pool, len(pool)):
        if len(chosen) == n:
            break
        with socket.socket() as s:  # no SO_REUSEADDR: any socket on the port, on any address, rules it out
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        chosen.append(port)
    if len(chosen) < n:
        raise RuntimeError(f"could not find {n} free ports outside {lo}-{hi}")
    return chosen


def free_port() -> int:
    return free_ports(1)[0]


def find_binary(name: str) -> str:
    for cand in (ROOT / ".tools" / "bin" / name, Path(sys.executable).parent / name):
        if cand.exists():
            return str(cand)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: run `infra/install-tools.sh` (or put {name} on PATH)")
    return found


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open in {timeout}s")


def terminate(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` if it runs, and SIGKILL it if it has not exited ``timeout`` seconds later."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Server:
    proc: subprocess.Popen[bytes] | None
    url: str
    extra: dict[str, object] = field(default_factory=dict)

    def stop(self) -> None:
        terminate(self.proc)


def start_nats(workdir: Path) -> Server:
    port, mon = free_port(), free_port()
    store = workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "nats.log", "wb")
    proc = subprocess.Popen(
        [find_binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-m", str(mon), "-sd", str(store)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    wait_port(port, proc=proc)
    return Server(proc, f"nats://127.0.0.1:{port}", {"monitor_port": mon})


def livekit_config(port: int, tcp_port: int, udp_start: int, prom_port: int, webhook_url: str | None = None) -> str:
    hook = f"""webhook:
  api_key: devkey
  urls: ["{webhook_url}"]
""" if webhook_url else ""
    return f"""port: {port}
bind_addresses: ["127.0.0.1"]
rtc:
  tcp_port: {tcp_port}
  port_range_start: {udp_start}
  port_range_end: {udp_start + 100}
  use_external_ip: false
  node_ip: 127.0.0.1
keys:
  devkey: secret
prometheus_port: {prom_port}
room:
  empty_timeout: 900
  departure_timeout: 20
  auto_create: false
logging:
  level: info
{hook}"""


def start_livekit(workdir: Path, webhook_url: str | None = None) -> Server:
    """livekit-server on free ports; with ``webhook_url`` it posts its webhooks there (signed with devkey)."""
    port, tcp, prom = free_ports(3)
    lo, hi = _ephemeral_range()
    udp_start = random.choice([p for p in range(15000, 64800, 100) if p + 100 < lo or p > hi])
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "livekit.yaml"
    cfg.write_text(livekit_config(port, tcp, udp_start, prom, webhook_url))
    log = open(workdir / "livekit.log", "wb")
    proc = subprocess.Popen([find_binary("livekit-server"), "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            break
        except Exception:
            time.sleep(0.1)
    return Server(proc, f"ws://127.0.0.1:{port}", {"prometheus_port": prom, "config": str(cfg)})


def start_webhook(workdir: Path, nats_url: str, port: int, api_key: str = "devkey", api_secret: str = "secret") -> Server:
    """crosstalk's webhook receiver (``python -m services.webhook``) on ``port``, publishing to ``nats_url``."""
    import os

    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ, "NATS_URL": nats_url, "LIVEKIT_API_KEY": api_key, "LIVEKIT_API_SECRET": api_secret,
        "CROSSTALK_WEBHOOK_PORT": str(port), "CROSSTALK_METRICS_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
    }
    log = open(workdir / "webhook.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.webhook"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc)
    return Server(proc, f"http://127.0.0.1:{port}/webhook", {"log": str(workdir / "webhook.log")})
