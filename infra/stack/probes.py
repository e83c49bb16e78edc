"""Looking at the machine: this stack's processes (by tag), ports, HTTP health, log tails."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import psutil

from infra.stack.config import TAG, Config


def tagged_processes(cfg: Config) -> list[psutil.Process]:
    """Every live process that belongs to this stack (carries its tag), except us and our ancestors."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG) == str(cfg.run_dir):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str:
    try:
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tcp_ok(url: str, default_port: int) -> bool:
    parts = urlsplit(url.split(",")[0].strip())
    port = parts.port or (443 if parts.scheme in ("wss", "https", "tls") else default_port)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=3):
            return True
    except OSError:
        return False


def log_tail(cfg: Config, name: str, lines: int = 12) -> str:
    path = cfg.logs / f"{name}.log"
    if not path.exists():
        return ""
    text = path.read_bytes()[-8192:].decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join("    | " + ln for ln in text)


@contextmanager
def suppress_psutil() -> Iterator[None]:
    try:
        yield
    except psutil.Error:
        pass
