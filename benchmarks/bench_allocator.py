"""Allocator throughput and latency, next to raw JetStream conditional publishes on the same server.

    PYTHONPATH=.:tests python benchmarks/bench_allocator.py [--requesters 200] [--seconds 10] [--instances 1]

Starts its own nats-server (or uses --nats-url) and `python -m services.allocator`
processes. Phase 1: N concurrent requesters, each asking for roles in fresh rooms (two
jobs a room, so every request is a grant and an append). Phase 2, same server, same run:
N concurrent publishers doing what one append costs on its own, a JetStream publish with
``Nats-Expected-Last-Subject-Sequence`` to a fresh ROLES subject. Prints both and the
ratio and writes benchmarks/results/allocator.json.

A grant costs a core request hop to the allocator, two direct gets (the room's last
event, then the other role's) and one conditional publish, all through one Python
process per instance, so it lands well under a third of the raw publish rate; the ratio
is the number to watch when the allocator changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import uvloop
from nats.aio.client import Client
from support.servers import free_port, start_nats

from services.allocator.main import EXPECTED_SEQ
from shared import bus, contracts, subjects
from shared.contracts import RoleReply, RoleRequest

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results" / "allocator.json"
CONNECTIONS = 4


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000, method="inclusive")[int(q * 1000) - 1] if len(samples) > 1 else samples[0]


async def closed_loop(
    n: int, seconds: float, warmup: float, op: Callable[[int, int], Awaitable[None]]
) -> tuple[int, list[float], float]:
    """``n`` workers call ``op(worker, k)`` back to back; count and time those after the warmup."""
    latencies: list[float] = []
    measuring = False
    t_start = 0.0
    stop_at = time.perf_counter() + warmup + seconds

    async def worker(w: int) -> None:
        k = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await op(w, k)
            if measuring and t0 >= t_start:
                latencies.append(time.perf_counter() - t0)
            k += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(n)]
    await asyncio.sleep(warmup)
    measuring, t_start = True, time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t_start
    return len(latencies), latencies, elapsed


def summary(count: int, latencies: list[float], elapsed: float) -> dict[str, float]:
    return {
        "ops": count,
        "seconds": round(elapsed, 3),
        "per_s": round(count / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }


async def bench(url: str, args: argparse.Namespace) -> dict[str, object]:
    conns: list[Client] = [await nats.connect(url, name=f"bench-{i}") for i in range(CONNECTIONS)]
    js_list = [nc.jetstream(timeout=10) for nc in conns]
    await bus.jetstream(conns[0])  # streams exist
    run_id = os.urandom(3).hex()
    denied = 0

    async def grant(w: int, k: int) -> None:
        nonlocal denied
        room = f"bench{run_id}-{w}-{k // 2}"
        req = RoleRequest(room=room, job_id=f"AJ_{w}_{k}", identity=f"bench {w}")
        msg = await conns[w % CONNECTIONS].request(subjects.ROLE_REQUEST, contracts.encode(req), timeout=30)
        if not contracts.decode(msg.data, RoleReply).granted:
            denied += 1

    async def raw_publish(w: int, k: int) -> None:
        subject = subjects.role_lease(f"raw{run_id}-{w}-{k}", "customer")
        await js_list[w % CONNECTIONS].publish(subject, b'{"kind":"granted"}', headers={EXPECTED_SEQ: "0"})

    alloc = summary(*await closed_loop(args.requesters, args.seconds, args.warmup, grant))
    raw = summary(*await closed_loop(args.requesters, args.seconds, args.warmup, raw_publish))
    for nc in conns:
        await nc.drain()
    return {
        "allocator": {**alloc, "denied": denied},
        "raw_conditional_publish": raw,
        "ratio_allocator_to_raw": round(alloc["per_s"] / raw["per_s"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requesters", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--instances", type=int, default=1, help="allocator processes")
    ap.add_argument("--nats-url", default=None, help="use this server instead of starting one")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-allocator-"))
    server = None if args.nats_url else start_nats(tmp / "nats")
    url = args.nats_url or server.url  # type: ignore[union-attr]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(args.instances):
            log_path = tmp / f"allocator-{i}.log"
            env = dict(os.environ, NATS_URL=url, CROSSTALK_METRICS_PORT=str(free_port()))
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "services.allocator"], cwd=ROOT, env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 30
            while b'"msg": "ready"' not in log_path.read_bytes():
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"allocator {i} did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.05)
        # The allocator logs every grant; keep that out of the way by sending it to the file above.
        result = uvloop.run(bench(url, args))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if server:
            server.stop()

    result["config"] = {
        "requesters": args.requesters, "seconds": args.seconds, "instances": args.instances,
        "connections": CONNECTIONS, "python": platform.python_version(), "cpus": os.cpu_count(),
        "nats_server": "external" if args.nats_url else "local, file storage",
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    a, r = result["allocator"], result["raw_conditional_publish"]
    print(f"allocator   {a['per_s']:>9.1f} grants/s   p50 {a['p50_ms']:.2f} ms   p99 {a['p99_ms']:.2f} ms"  # type: ignore[index]
          f"   ({args.requesters} requesters, {args.instances} instance(s), denied {a['denied']})")  # type: ignore[index]
    print(f"raw publish {r['per_s']:>9.1f} pubs/s     p50 {r['p50_ms']:.2f} ms   p99 {r['p99_ms']:.2f} ms"  # type: ignore[index]
          "   (JetStream publish + Nats-Expected-Last-Subject-Sequence)")
    print(f"ratio       {result['ratio_allocator_to_raw']:.3f} (allocator grants / raw conditional publishes)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
