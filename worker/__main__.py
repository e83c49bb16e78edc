"""``python -m worker``: run one unified worker process (as many as you like, anywhere)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time

from shared import bus, config, metrics
from shared.log import kv, setup

log = logging.getLogger("worker")


def main() -> None:
    setup("worker")
    settings = config.load_or_exit(log)
    from worker.lifecycle.capacity import Announcer
    from worker.lifecycle.server import serve
    from worker.main import build

    wm = metrics.WorkerMetrics()
    port = metrics.serve("worker", settings.metrics_host, settings.metrics_port)
    server = build(settings, wm)
    log.info("worker starting", extra=kv(agent_name=settings.agent_name, livekit=settings.livekit_url,
                                         executor=settings.worker_executor, metrics_port=port,
                                         max_jobs=settings.worker_max_jobs))

    watchdog = subprocess.Popen([sys.executable, "-m", "worker.lifecycle.watchdog", str(os.getpid()), str(port),
                                 str(settings.worker_hang_s)])

    async def beat() -> None:
        while True:
            wm.heartbeat.set(time.time())
            await asyncio.sleep(1)

    async def run(stop: asyncio.Event) -> None:
        beating = asyncio.create_task(beat())
        # Capacity heartbeats on NATS (worker/lifecycle/capacity.py), from the moment livekit-server has
        # registered this worker: before that, announced slots could not be given jobs.
        nc = await bus.connect(settings.nats_url, "worker-capacity")
        announcer = Announcer(nc, server, agent_name=settings.agent_name, max_jobs=settings.worker_max_jobs,
                              metrics=wm)
        server.on("worker_registered", lambda *_: announcer.start() if announcer.idle else None)
        if not await serve(server, stop):
            return
        log.info("worker draining")
        await announcer.close()
        await server.drain(timeout=int(settings.worker_drain_s))
        await server.aclose()
        await announcer.stop()
        await nc.close()
        beating.cancel()

    # The worker's loop is asyncio's own unless CROSSTALK_WORKER_LOOP=uvloop; the benchmarks in
    # benchmarks/ were measured on asyncio. (Freezes once blamed on uvloop were the loop-monitor
    # deadlock that server.disable_loop_monitor avoids.)
    try:
        bus.run(run, use_uvloop=os.environ.get("CROSSTALK_WORKER_LOOP", "asyncio") == "uvloop")
    finally:
        watchdog.terminate()


if __name__ == "__main__":
    main()
