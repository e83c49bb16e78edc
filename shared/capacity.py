"""Worker capacity: what every worker process announces, and the dispatcher's view of it.

Each worker process publishes a :class:`~shared.contracts.WorkerCapacity` heartbeat on
``worker.capacity.<worker_id>`` (core NATS, no stream) every ``HEARTBEAT_S``: its capacity in
agent sessions, how many are free, and the room of every active job. The dispatcher keeps the
latest heartbeat per worker in a :class:`Fleet` and forgets a worker ``EXPIRY_S`` after its
last one (measured on the dispatcher's own monotonic clock: no clock skew between machines).
So a SIGKILLed or frozen worker's slots vanish from admission within ``EXPIRY_S``, and a new
worker's slots appear with its first heartbeat.

Why core NATS and not a JetStream KV bucket with a TTL: the state is ephemeral and refreshed
every second, so persisting it buys nothing (a restarted dispatcher has the whole picture after
one interval, and admits nothing until then); a KV watcher is not told when a key ages out, so
the dispatcher would have to expire entries itself anyway; and N workers writing to disk every
second is load on the same NATS server that carries the turns.

Nothing here does I/O or reads a clock: callers pass ``now``.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping

import msgspec

from shared.contracts import WorkerCapacity

HEARTBEAT_S = 1.0
# Three missed heartbeats and some slack for a busy event loop.
EXPIRY_S = 4.0


def new_worker_id(host: str | None = None, pid: int | None = None) -> str:
    """``w-<host>-<pid>-<random>``: unique per process start, a valid subject token."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", (host or socket.gethostname()).split(".")[0])[:40] or "host"
    return f"w-{host}-{pid or os.getpid()}-{uuid.uuid4().hex[:6]}"


def heartbeat(*, worker_id: str, agent_name: str, capacity: int, rooms: Iterable[str], at: float,
              livekit_worker_id: str | None = None, closing: bool = False) -> WorkerCapacity:
    """One heartbeat from one consistent snapshot of a worker's active jobs (one room per job)."""
    rooms = tuple(sorted(rooms))
    return WorkerCapacity(
        worker_id=worker_id, agent_name=agent_name, capacity=capacity, active=len(rooms),
        free=0 if closing else max(0, capacity - len(rooms)), rooms=rooms, interval_s=HEARTBEAT_S,
        closing=closing, livekit_worker_id=livekit_worker_id, at=at)


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """What the live workers hold right now, as a value the dispatcher's pure core can plan with.

    ``free``: agent sessions free across live workers. ``placed``: per room, the agent sessions
    that live workers already run in it (a conversation's sessions that are placed are no
    longer free, so they must not be reserved twice).
    """

    workers: int = 0
    capacity: int = 0
    free: int = 0
    placed: Mapping[str, int] = msgspec.field(default_factory=dict)


class Fleet:
    """The latest heartbeat of every live worker of one agent name; expired ones are forgotten."""

    def __init__(self, agent_name: str, expiry_s: float = EXPIRY_S) -> None:
        self.agent_name = agent_name
        self.expiry_s = expiry_s
        self._seen: dict[str, tuple[float, WorkerCapacity]] = {}

    def observe(self, hb: WorkerCapacity, now: float) -> bool:
        """Take one heartbeat; False when it is for another agent name."""
        if hb.agent_name != self.agent_name:
            return False
        self._seen[hb.worker_id] = (now, hb)
        return True

    def expire(self, now: float) -> list[str]:
        """Forget workers silent for longer than the expiry; returns their ids."""
        gone = [w for w, (seen, _) in self._seen.items() if now - seen > self.expiry_s]
        for w in gone:
            del self._seen[w]
        return gone

    def live(self, now: float) -> list[WorkerCapacity]:
        return [hb for seen, hb in self._seen.values() if now - seen <= self.expiry_s]

    def view(self, now: float) -> Capacity:
        live = self.live(now)
        placed: Counter[str] = Counter()
        for hb in live:
            placed.update(hb.rooms)
        return Capacity(workers=len(live), capacity=sum(0 if hb.closing else hb.capacity for hb in live),
                        free=sum(hb.free for hb in live), placed=dict(placed))
