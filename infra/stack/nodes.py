"""The servers of a stack, one or several nodes: nats-server (one, or a 3-node JetStream cluster:
``CROSSTALK_NATS_NODES=3``) and livekit-server (one, or two nodes sharing a Redis:
``CROSSTALK_LIVEKIT_NODES=2``, LiveKit's own multi-node mode; rooms are placed on either node)."""

from __future__ import annotations

from infra.stack.config import Config
from infra.stack.program import Program


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
        # the monitor listens on infra/nats.conf's `http:` host, loopback (-m sets only its port)
        out.append(Program(
            name, argv,
            f"nats://{h}:{client}  (JetStream store {store}, monitor http://127.0.0.1:{monitor})",
            # a cluster node is healthy once JetStream is (meta leader elected, streams current)
            f"http://127.0.0.1:{monitor}/healthz" + ("" if cfg.nats_nodes else "?js-enabled-only=true"),
            ports, priority=10, startsecs=1,
        ))
    return out


def livekit_programs(cfg: Config, livekit_server: str, redis_server: str | None = None) -> list[Program]:
    """livekit-server, or two nodes of it and the Redis they share (``redis_server``, when 2 nodes).
    Each node: its own HTTP/RTC TCP/metrics ports and half of the UDP range; the same config."""
    h = cfg.host
    lo, hi = cfg.livekit_udp
    nodes = [(cfg.livekit_port, cfg.livekit_tcp_port, cfg.livekit_metrics_port)] + list(cfg.livekit_more_nodes)
    size = (hi - lo + 1) // len(nodes)
    out = []
    if len(nodes) > 1:
        if redis_server is None:
            raise ValueError("a multi-node livekit needs redis-server")
        out.append(Program(
            "redis", (redis_server, "--port", str(cfg.redis_port), "--bind", h, "--save", "", "--appendonly", "no"),
            f"redis://{h}:{cfg.redis_port}  (livekit-server's shared state, nothing persisted)", None,
            (cfg.redis_port,), priority=5, startsecs=1,
        ))
    for i, (port, tcp, metrics) in enumerate(nodes):
        start, end = lo + i * size, (lo + (i + 1) * size - 1) if i < len(nodes) - 1 else hi
        out.append(Program(
            "livekit" if i == 0 else f"livekit-{i + 1}",
            (livekit_server, "--config", str(cfg.run_dir / "livekit.yaml"), "--bind", h,
             "--port", str(port), "--rtc.tcp_port", str(tcp),
             "--rtc.port_range_start", str(start), "--rtc.port_range_end", str(end),
             "--prometheus_port", str(metrics)),
            f"ws://{h}:{port}  (key {cfg.livekit_key}, rtc tcp {tcp} udp {start}-{end}, "
            f"metrics http://{h}:{metrics}/metrics)",
            f"http://{h}:{port}/",
            (port, tcp, metrics),
            priority=10, startsecs=1,
        ))
    return out
