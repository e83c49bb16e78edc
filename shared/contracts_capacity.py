"""The capacity contracts: a worker's heartbeat and the dispatcher's admission view (core NATS).

Part of :mod:`shared.contracts` (re-exported there); apart only to keep each file short.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from shared.contracts_base import Struct
from shared.ids import Token

Count = Annotated[int, msgspec.Meta(ge=0)]


class WorkerCapacity(Struct, frozen=True, kw_only=True):
    """A worker process's heartbeat on ``worker.capacity.<worker_id>`` (core NATS, every ``interval_s``).

    ``capacity`` agent sessions at most, ``active`` running, ``free`` more it accepts (0 while
    ``closing``); ``rooms`` the room of every active job, one entry per job. See shared/capacity.py.
    """

    worker_id: Token
    agent_name: Token
    capacity: Count
    active: Count
    free: Count
    rooms: tuple[str, ...] = ()
    interval_s: float
    closing: bool = False
    livekit_worker_id: str | None = None
    at: float


class BatchQueue(Struct, frozen=True, kw_only=True):
    """One running batch in :class:`DispatcherStatus`: ``queued`` conversations its concurrency
    would run now but worker capacity does not admit yet; ``pending`` all not yet in flight."""

    in_flight: Count
    queued: Count
    pending: Count


class DispatcherStatus(Struct, frozen=True, kw_only=True):
    """The dispatcher's admission view on ``dispatcher.status`` (core NATS, about every second)."""

    workers: Count
    capacity: Count
    free: Count
    reserved: Count
    queued: Count
    batches: dict[str, BatchQueue] = {}
    at: float
