"""The stack's configuration, read once from the environment and crosstalk.toml (``Config.from_env``).

One config: what the crosstalk processes read themselves (model and webhook ports, the LiveKit
key, the data dir, sessions per worker) comes from ``shared.config.load``, with its validation;
the /metrics ports default to ``shared.metrics.DEFAULT_PORTS``, the NATS and LiveKit ports to
the URLs every process uses by default. Only what the stack alone uses is read here: the ports
of the servers it runs, its run dir and host, which programs to start, and how many workers.

crosstalk.toml (and .env) is read here once, by ``shared.config.load``, which exports its values into
this process's environment (the environment still wins): every program the stack starts inherits
them as variables, so the services read no file of their own and need no change, and the stack's own
variables below (ports, dirs, workers) come from the file as any other. An error in one names the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from infra.stack import sizing
from shared import config as shared_config
from shared.config import Settings
from shared.metrics import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TAG = "CROSSTALK_STACK"  # env var every process of one stack carries: its run dir

# The crosstalk processes, in start order, and how to run them (python -m ...).
CROSSTALK_PROGRAMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("-m", "services.model")),
    ("speech", ("-m", "services.speech")),
    ("llm", ("-m", "services.llm")),  # the local model: only when installed or asked (plan.llm_wanted)
    ("webhook", ("-m", "services.webhook")),
    ("allocator", ("-m", "services.allocator")),
    ("dispatcher", ("-m", "services.dispatcher")),
    ("sink", ("-m", "services.sink")),
    ("judge", ("-m", "services.judge")),
    ("worker", ("-m", "worker", "start")),
)
ALL_NAMES = ("nats", "livekit", *(name for name, _ in CROSSTALK_PROGRAMS), "prometheus", "grafana")


class InRunDir:
    """A path in the stack's run dir, read as an attribute of :class:`Config` (``cfg.sock``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, cfg: Config, owner: type | None = None) -> Path:
        return cfg.run_dir / self.name


def metrics_port_var(name: str) -> str:
    return f"CROSSTALK_{name.upper()}_METRICS_PORT"


# Every TCP port a stack listens on: its variable and default. Ports the crosstalk processes read
# themselves are shared's; the rest belong to the servers only the stack runs.
PORTS: dict[str, int] = {
    "CROSSTALK_NATS_PORT": urlsplit(Settings.nats_url).port or 4222,
    "CROSSTALK_NATS_MONITOR_PORT": 8222,
    # the NATS cluster profile (CROSSTALK_NATS_NODES=3): route port of each node, nodes 2 and 3
    "CROSSTALK_NATS_CLUSTER_PORT": 6222,
    "CROSSTALK_NATS_2_PORT": 4223, "CROSSTALK_NATS_2_MONITOR_PORT": 8223, "CROSSTALK_NATS_2_CLUSTER_PORT": 6223,
    "CROSSTALK_NATS_3_PORT": 4224, "CROSSTALK_NATS_3_MONITOR_PORT": 8224, "CROSSTALK_NATS_3_CLUSTER_PORT": 6224,
    # the two-node LiveKit profile (CROSSTALK_LIVEKIT_NODES=2): node 2, and the Redis both share
    "CROSSTALK_LIVEKIT_2_PORT": 7882, "CROSSTALK_LIVEKIT_2_TCP_PORT": 7883, "CROSSTALK_LIVEKIT_2_METRICS_PORT": 6790,
    "CROSSTALK_REDIS_PORT": 6379,
    "CROSSTALK_LIVEKIT_PORT": urlsplit(Settings.livekit_url).port or 7880,
    "CROSSTALK_LIVEKIT_TCP_PORT": 7881,
    "CROSSTALK_LIVEKIT_METRICS_PORT": 6789,
    "CROSSTALK_MODEL_PORT": Settings.model_port,
    "CROSSTALK_SPEECH_PORT": Settings.speech_port,
    "CROSSTALK_LLM_PORT": Settings.llm_port,
    "CROSSTALK_WEBHOOK_PORT": Settings.webhook_port,
    "CROSSTALK_PROMETHEUS_PORT": 9090,
    "CROSSTALK_GRAFANA_PORT": 3000,
    **{metrics_port_var(name): port for name, port in DEFAULT_PORTS.items()},
}
LIVEKIT_UDP_PORTS = "50000-51999"  # one UDP port per participant; voice batches need hundreds (benchmarks: 100 ports stalled at room 34)


class StackError(Exception):
    """One line for the user: what is wrong and what to do."""


def _port(env: dict[str, str], var: str) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return PORTS[var]
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise StackError(f"{var}: must be a port number 1-65535, got {raw!r}")
    return int(raw)


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
    speech_port: int
    llm_port: int
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
    nats_conf: Path = INFRA / "nats.conf"  # CROSSTALK_NATS_CONF: e.g. the secured one (infra/stack/secure.py)
    # CROSSTALK_NATS_NODES=3: a 3-node NATS cluster on this host; per node (client, monitor, route) port
    nats_nodes: tuple[tuple[int, int, int], ...] = ()
    # CROSSTALK_LIVEKIT_NODES=2: livekit-server nodes beyond the first, (port, rtc tcp, metrics) each
    livekit_more_nodes: tuple[tuple[int, int, int], ...] = ()
    redis_port: int = 6379
    settings: Settings = field(default_factory=Settings, repr=False)  # what the processes will read

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        """``env`` None: this process's environment and crosstalk.toml (exported to it); else ``env`` only."""
        try:
            sources = shared_config.sources(env)
            settings = shared_config.load(env)  # env None: the file's values are now the environment's too
        except shared_config.ConfigError as exc:
            raise StackError(str(exc)) from None
        try:
            return cls._from(dict(os.environ if env is None else env), settings)
        except StackError as exc:  # the stack's own variables: "VAR: reason"; from a file, name it
            var, _, reason = str(exc).partition(": ")
            raise StackError(str(sources.located(shared_config.ConfigError(var, reason)))) from None

    @classmethod
    def _from(cls, e: dict[str, str], settings: Settings) -> Config:
        udp_raw = e.get("CROSSTALK_LIVEKIT_UDP_PORTS", "").strip() or LIVEKIT_UDP_PORTS
        try:
            lo, hi = (int(x) for x in udp_raw.split("-", 1))
            if not 1024 <= lo < hi <= 65535:
                raise ValueError
        except ValueError:
            raise StackError(f"CROSSTALK_LIVEKIT_UDP_PORTS: must be a range like 50000-51999, got {udp_raw!r}") from None
        only_raw = e.get("CROSSTALK_SERVICES", "").strip()
        only = frozenset(s.strip() for s in only_raw.split(",") if s.strip()) if only_raw else None
        if only is not None and (unknown := sorted(only - set(ALL_NAMES))):
            raise StackError(f"CROSSTALK_SERVICES: unknown {', '.join(unknown)} (known: {', '.join(ALL_NAMES)})")
        try:
            timeout = float(e.get("CROSSTALK_UP_TIMEOUT_S", "") or 180)
        except ValueError:
            raise StackError("CROSSTALK_UP_TIMEOUT_S: must be a number of seconds") from None
        workers_raw = e.get("CROSSTALK_WORKERS", "").strip()
        if workers_raw and (not workers_raw.isdigit() or not 1 <= int(workers_raw) <= sizing.MAX_WORKERS):
            raise StackError(f"CROSSTALK_WORKERS: must be a whole number of worker processes 1-{sizing.MAX_WORKERS}, "
                             f"got {workers_raw!r} (unset: sized to the machine)")
        workers, workers_why = sizing.choose(workers_raw, settings.worker_max_jobs)
        run_dir = e.get("CROSSTALK_RUN_DIR", "").strip()
        nats_conf = Path(e.get("CROSSTALK_NATS_CONF", "").strip() or INFRA / "nats.conf")
        if not nats_conf.is_file():
            raise StackError(f"CROSSTALK_NATS_CONF: {nats_conf} is not a file")
        nodes_raw = e.get("CROSSTALK_NATS_NODES", "").strip() or "1"
        if nodes_raw not in ("1", "3"):
            raise StackError(f"CROSSTALK_NATS_NODES: must be 1 or 3 (a JetStream cluster), got {nodes_raw!r}")
        nats_nodes = tuple(
            (_port(e, f"CROSSTALK_NATS{sfx}_PORT"), _port(e, f"CROSSTALK_NATS{sfx}_MONITOR_PORT"),
             _port(e, f"CROSSTALK_NATS{sfx}_CLUSTER_PORT"))
            for sfx in ("", "_2", "_3")[: int(nodes_raw)]
        ) if nodes_raw == "3" else ()
        lk_nodes = e.get("CROSSTALK_LIVEKIT_NODES", "").strip() or "1"
        if lk_nodes not in ("1", "2"):
            raise StackError(f"CROSSTALK_LIVEKIT_NODES: must be 1 or 2 (two nodes sharing a Redis), got {lk_nodes!r}")
        livekit_more_nodes = ((_port(e, "CROSSTALK_LIVEKIT_2_PORT"), _port(e, "CROSSTALK_LIVEKIT_2_TCP_PORT"),
                               _port(e, "CROSSTALK_LIVEKIT_2_METRICS_PORT")),) if lk_nodes == "2" else ()
        return cls(
            run_dir=Path(run_dir).expanduser().resolve() if run_dir else ROOT / "run",
            data_dir=settings.data_dir.expanduser().resolve() if e.get("CROSSTALK_DATA_DIR", "").strip()
            else ROOT / "data",
            host=e.get("CROSSTALK_HOST", "").strip() or "127.0.0.1",
            nats_port=_port(e, "CROSSTALK_NATS_PORT"),
            nats_monitor_port=_port(e, "CROSSTALK_NATS_MONITOR_PORT"),
            livekit_port=_port(e, "CROSSTALK_LIVEKIT_PORT"),
            livekit_tcp_port=_port(e, "CROSSTALK_LIVEKIT_TCP_PORT"),
            livekit_udp=(lo, hi),
            livekit_metrics_port=_port(e, "CROSSTALK_LIVEKIT_METRICS_PORT"),
            model_port=settings.model_port,
            speech_port=settings.speech_port,
            llm_port=settings.llm_port,
            metrics_ports={name: _port(e, metrics_port_var(name)) for name in DEFAULT_PORTS},
            webhook_port=settings.webhook_port,
            prometheus_port=_port(e, "CROSSTALK_PROMETHEUS_PORT"),
            grafana_port=_port(e, "CROSSTALK_GRAFANA_PORT"),
            external_nats=e.get("NATS_URL", "").strip() or None,
            external_livekit=e.get("LIVEKIT_URL", "").strip() or None,
            livekit_key=settings.livekit_api_key,
            only=only,
            up_timeout_s=timeout,
            workers=workers,
            workers_why=workers_why,
            nats_conf=nats_conf,
            nats_nodes=nats_nodes,
            livekit_more_nodes=livekit_more_nodes,
            redis_port=_port(e, "CROSSTALK_REDIS_PORT"),
            settings=settings,
        )

    def worker_metrics_ports(self) -> list[int]:
        """Consecutive from the worker's port, skipping the other programs' ports (many sized workers)."""
        taken = {p for n, p in self.metrics_ports.items() if n != "worker"} | {self.webhook_port, self.model_port,
                                                                             self.speech_port, self.llm_port}
        ports: list[int] = []
        port = self.metrics_ports["worker"]
        while len(ports) < self.workers:
            if port not in taken:
                ports.append(port)
            port += 1
        return ports

    @property
    def nats_url(self) -> str:
        """The server's URL; on the cluster profile every node's, comma-separated (shared.bus.connect)."""
        if self.external_nats:
            return self.external_nats
        if self.nats_nodes:
            return ",".join(f"nats://{self.host}:{client}" for client, _, _ in self.nats_nodes)
        return f"nats://{self.host}:{self.nats_port}"

    @property
    def livekit_url(self) -> str:
        return self.external_livekit or f"ws://{self.host}:{self.livekit_port}"

    # what the stack keeps in its run dir
    sock = InRunDir("supervisor.sock")
    conf = InRunDir("supervisord.conf")
    logs = InRunDir("logs")
    state_file = InRunDir("stack.json")

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only
