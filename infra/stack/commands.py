"""``up``, ``down``, ``status`` and ``logs``: the stack's lifecycle under supervisord."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import xmlrpc.client
from collections.abc import Sequence

import psutil

from infra.stack.config import PORTS, Config, StackError, metrics_port_var
from infra.stack.plan import Plan, Program, plan
from infra.stack.probes import (
    http_ok,
    log_tail,
    port_busy,
    port_holder,
    suppress_psutil,
    tagged_processes,
    tcp_ok,
)
from infra.stack.render import render_livekit, render_prometheus, render_supervisord
from infra.stack.secure import provision
from infra.stack.supervisor import (
    RPC_ERRORS,
    locked,
    process_infos,
    rpc,
    secret_fingerprint,
    supervisor_bin,
    supervisord_env,
    supervisord_pid,
)


def check_external(p: Plan) -> None:
    if "nats" in p.external and not tcp_ok(p.external["nats"], PORTS["CROSSTALK_NATS_PORT"]):
        raise StackError(f"NATS_URL={p.external['nats']} does not answer: start that server, "
                         "or unset NATS_URL so `./ct up` runs nats-server")
    if "livekit" in p.external and not tcp_ok(p.external["livekit"], PORTS["CROSSTALK_LIVEKIT_PORT"]):
        raise StackError(f"LIVEKIT_URL={p.external['livekit']} does not answer: start that server, "
                         "or unset LIVEKIT_URL so `./ct up` runs livekit-server")


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
                                 "run `./ct down`, then `./ct up`")
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
                                 f"(pids {', '.join(str(x.pid) for x in leftovers)}): run `./ct down` first")
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
    # the secured profile: streams are the operator's, created here; the services wait for them
    asyncio.run(provision(cfg.nats_url))
    wait_healthy(cfg, p.programs)
    print_summary(cfg, p)
    return p


def env_hint(name: str) -> str:
    """The variables that move a program's ports."""
    own = {"nats": ["CROSSTALK_NATS_PORT", "CROSSTALK_NATS_MONITOR_PORT"],
           "livekit": ["CROSSTALK_LIVEKIT_PORT", "CROSSTALK_LIVEKIT_METRICS_PORT"],
           "model": ["CROSSTALK_MODEL_PORT"], "webhook": ["CROSSTALK_WEBHOOK_PORT"],
           "prometheus": ["CROSSTALK_PROMETHEUS_PORT"], "grafana": ["CROSSTALK_GRAFANA_PORT"]}.get(name, [])
    metrics = metrics_port_var(name.split("-")[0])
    return ", ".join(own + ([metrics] if metrics in PORTS else []))


def wait_healthy(cfg: Config, programs: Sequence[Program]) -> None:
    deadline = time.monotonic() + cfg.up_timeout_s
    t0 = time.monotonic()
    pending = {p.name: p for p in programs}
    while pending:
        try:
            states = {i["name"]: i["statename"] for i in process_infos(cfg)}
        except RPC_ERRORS:
            raise StackError(f"supervisord stopped answering: see {cfg.logs / 'supervisord.log'}") from None
        for name, prog in list(pending.items()):
            state = states.get(name, "MISSING")
            if state in ("FATAL", "EXITED", "MISSING"):
                tail = log_tail(cfg, name)
                raise StackError(f"{name} is {state}: see {cfg.logs / (name + '.log')} "
                                 f"(`./ct logs {name}`; `./ct down` stops the rest)"
                                 + (f"\n{tail}" if tail else ""))
            if state == "RUNNING" and (prog.health is None or http_ok(prog.health)):
                print(f"  ok  {name:<11} {time.monotonic() - t0:5.1f}s")
                del pending[name]
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{n} ({states.get(n, '?')})" for n in pending)
            raise StackError(f"not healthy after {cfg.up_timeout_s:g}s: {names}; see `./ct logs <name>`, "
                             "or raise CROSSTALK_UP_TIMEOUT_S")
        if pending:
            time.sleep(0.25)


def print_summary(cfg: Config, p: Plan) -> None:
    print(f"crosstalk stack is up (supervisord, run dir {cfg.run_dir})")
    for prog in p.programs:
        print(f"  {prog.name:<11} {prog.where}")
    for name, url in p.external.items():
        print(f"  {name:<11} {url}  (external, not started here)")
    if any(x.name == "worker" for x in p.programs):
        print(f"  workers     {cfg.workers_why}")
    print(f"  data        {cfg.data_dir}")
    print(f"  logs        {cfg.logs}  (`./ct logs [name]`; `./ct status`; `./ct down` stops it all)")


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
            except RPC_ERRORS:
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


def status(cfg: Config) -> int:
    pid = supervisord_pid(cfg)
    if pid is None:
        print(f"crosstalk stack is not running (run dir {cfg.run_dir}); `./ct up` starts it")
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
            raise StackError(f"no logs in {cfg.logs}: `./ct up` first")
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), *map(str, files)]
    os.execvp("tail", argv)
    return 0
