"""Announce this worker process's capacity on NATS: one heartbeat a second (see shared/capacity.py).

Used by the real worker (``worker/__main__.py``) and by the test's fake agent worker
(``tests/support/fake_agent.py``), so both announce exactly the same way. The heartbeat runs on
the worker's main event loop, the one that serves livekit-server: a frozen worker stops
announcing, and its slots vanish from the dispatcher's admission within the expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from typing import Any

import msgspec
from livekit.agents import AgentServer
from livekit.agents import worker as lk_worker

from shared import capacity, contracts, subjects
from shared.contracts import WorkerCapacity

log = logging.getLogger(__name__)

# livekit-server learns a worker's load and status (AVAILABLE/FULL) only from the status update
# livekit-agents sends every UPDATE_STATUS_INTERVAL (2.5 s), computed from load_fnc at most
# UPDATE_LOAD_INTERVAL (0.5 s) earlier; until then it places no job on a worker it last saw FULL
# (pkg/service/agentservice.go selectWorkerWeightedByLoad). A worker that was full announces no
# free slot for this long after, or the dispatcher would admit conversations livekit-server drops.
FULL_HOLD_S = (getattr(lk_worker, "UPDATE_STATUS_INTERVAL", 2.5) + getattr(lk_worker, "UPDATE_LOAD_INTERVAL", 0.5)
               + 0.5)


def snapshot(server: AgentServer, *, worker_id: str, agent_name: str, max_jobs: int,
             closing: bool = False) -> WorkerCapacity:
    jobs = server.active_jobs  # one consistent list: rooms and the active count agree
    livekit_id = server.id if server.id != "unregistered" else None
    return capacity.heartbeat(worker_id=worker_id, agent_name=agent_name, capacity=max_jobs,
                              rooms=[j.job.room.name for j in jobs], at=time.time(),
                              livekit_worker_id=livekit_id, closing=closing)


def held_free(hb: WorkerCapacity, full_at: float | None, now: float) -> WorkerCapacity:
    """``hb`` with no free slot while livekit-server may still see this worker FULL."""
    if full_at is not None and now - full_at < FULL_HOLD_S and hb.free:
        return msgspec.structs.replace(hb, free=0)
    return hb


class JobCounter:
    """Jobs running in this process right now and the most at once, counted by the entrypoints
    themselves (exact, unlike a sampled gauge). Thread-safe: thread-executor jobs run in threads."""

    def __init__(self, metrics: Any = None) -> None:
        self.metrics = metrics
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def enter(self) -> int:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            running, peak = self.running, self.peak
        if self.metrics is not None:
            self.metrics.peak_active.set(peak)
        return running

    def exit(self) -> None:
        with self._lock:
            self.running -= 1


class Announcer:
    """Publishes :func:`snapshot` every ``capacity.HEARTBEAT_S`` while running; ``close()`` announces
    ``closing`` (no free slots) so a draining worker gets no new conversations."""

    def __init__(self, nc: Any, server: AgentServer, *, agent_name: str, max_jobs: int,
                 worker_id: str | None = None, metrics: Any = None) -> None:
        self.nc = nc
        self.server = server
        self.agent_name = agent_name
        self.max_jobs = max_jobs
        self.worker_id = worker_id or capacity.new_worker_id()
        self.subject = subjects.worker_capacity(self.worker_id)
        self.metrics = metrics
        self.closing = False
        self.full_at: float | None = None  # monotonic time load_fnc last saw this worker full
        self._task: asyncio.Task[None] | None = None
        self._watch_load()

    def _watch_load(self) -> None:
        """Wrap the server's load_fnc (what livekit-agents derives its FULL status from) to note
        when the worker was full, including moments between two heartbeats."""
        inner = self.server.load_fnc
        if inner is None:
            return
        takes_server = bool(inspect.signature(inner).parameters)

        def load(server: AgentServer) -> float:
            value = inner(server) if takes_server else inner()  # type: ignore[call-arg]
            if len(server.active_jobs) >= self.max_jobs:
                self.full_at = time.monotonic()
            return float(value)

        self.server.load_fnc = load

    async def publish(self) -> WorkerCapacity:
        hb = snapshot(self.server, worker_id=self.worker_id, agent_name=self.agent_name,
                      max_jobs=self.max_jobs, closing=self.closing)
        if hb.active >= self.max_jobs:
            self.full_at = time.monotonic()
        hb = held_free(hb, self.full_at, time.monotonic())
        if self.metrics is not None:
            self.metrics.capacity.set(self.max_jobs)
        await self.nc.publish(self.subject, contracts.encode(hb))
        return hb

    async def _run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:  # NATS reconnecting: the next beat tries again
                log.warning("capacity heartbeat not sent: %s", exc)
            await asyncio.sleep(capacity.HEARTBEAT_S)

    @property
    def idle(self) -> bool:
        return self._task is None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="capacity-heartbeat")

    async def close(self) -> None:
        """Announce ``closing`` (free 0) once; heartbeats go on so its running rooms stay placed."""
        self.closing = True
        with contextlib.suppress(Exception):
            await self.publish()
            await self.nc.flush(timeout=2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
