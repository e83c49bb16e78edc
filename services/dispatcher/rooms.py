"""LiveKit side of the dispatcher: rooms and explicit agent dispatches through livekit-api.

A room is created with its dispatches in the same ``CreateRoomRequest`` (``agents``), which also
keeps livekit-server's automatic dispatch out of it: livekit-server v1.13.5 gives a room created
without ``agents`` one dispatch with an empty agent name (pkg/rtc/room.go
``createAgentDispatchesFromRoomAgent``: "Backward compatibility: by default, start any agent in
the empty JobName"), so every worker registered without an ``agent_name`` (LiveKit's quickstart)
would join every room as a third agent; a room whose ``agents`` list is not empty gets exactly
those dispatches and no other (pkg/service/roomallocator.go ``CreateRoom`` stores ``req.Agents``
as ``RoomInternal.AgentDispatches``). tests/integration/test_dispatcher_autodispatch.py shows both.

One :class:`livekit.api.LiveKitAPI` per process (its aiohttp session reuses
connections); transient failures (transport errors, 5xx) are retried with
tenacity; every call is timed and counted in :class:`DispatcherMetrics`.
:class:`RoomEffects` runs these calls after the events that ask for them and
reports a room it could not open as a :class:`~.core.DispatchFailed` message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
from livekit import api
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from shared import contracts
from shared.config import Settings
from shared.contracts import ConversationDispatched, JobMetadata
from shared.log import kv
from shared.metrics import DispatcherMetrics

from . import target
from .core import DispatchFailed

log = logging.getLogger(__name__)

T = TypeVar("T")

DEPARTURE_TIMEOUT_S = 20
ATTR_SIMULATOR = "lk.simulator"  # livekit-agents' ATTRIBUTE_SIMULATOR


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, api.TwirpError):
        return exc.status >= 500 or exc.code in (api.TwirpErrorCode.UNAVAILABLE,
                                                  api.TwirpErrorCode.RESOURCE_EXHAUSTED)
    return isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError)


def _not_found(exc: BaseException) -> bool:
    return isinstance(exc, api.TwirpError) and exc.code == api.TwirpErrorCode.NOT_FOUND


def http_url(url: str) -> str:
    return "http" + url[2:] if url.startswith("ws") else url


class Rooms:
    def __init__(self, settings: Settings, metrics: DispatcherMetrics, *, attempts: int = 4) -> None:
        self._settings = settings
        self._metrics = metrics
        self._attempts = attempts
        self._api = api.LiveKitAPI(http_url(settings.livekit_url), settings.livekit_api_key,
                                   settings.livekit_api_secret, failover=False)

    async def aclose(self) -> None:
        await self._api.aclose()

    async def _call(self, name: str, fn: Callable[[], Awaitable[T]], *, attempts: int | None = None) -> T:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts or self._attempts),
            wait=wait_exponential_jitter(initial=0.2, max=3.0),
            retry=retry_if_exception(_transient),
            reraise=True,
        ):
            with attempt:
                started = time.perf_counter()
                try:
                    return await fn()
                except Exception as exc:
                    if not _not_found(exc):
                        self._metrics.livekit_api_errors.labels(name).inc()
                    raise
                finally:
                    self._metrics.livekit_api.labels(name).observe(time.perf_counter() - started)
        raise RuntimeError("unreachable")

    async def open(self, room: str, meta: JobMetadata) -> None:
        """Create the room with its dispatches, in one call (a fresh attempt).

        A retried ``create_room`` whose first try landed gets the room that try created, dispatches
        and all (livekit-server returns an existing room as it is), so no dispatch is ever doubled.
        """
        await self._create_room(room, meta)

    async def ensure(self, room: str, meta: JobMetadata) -> None:
        """Idempotent :meth:`open` for an attempt resumed after a restart: create only what is missing."""
        await self._create_room(room, meta)  # returns the existing room if there is one
        await self._dispatches(room, meta)

    async def _missing(self, room: str, wanted: list[api.CreateAgentDispatchRequest]) -> list[api.CreateAgentDispatchRequest]:
        existing = await self._call("list_dispatch", lambda: self._api.agent_dispatch.list_dispatch(room))
        return target.missing(wanted, (d.agent_name for d in existing))

    async def _dispatches(self, room: str, meta: JobMetadata) -> None:
        """Create the room's missing dispatches (two of crosstalk's, or one customer against a target: target.py).

        A ``create_dispatch`` that failed in transit (timeout, reset, 5xx) may still have landed: it is
        never retried blindly (a second dispatch would put a third agent in the room); the room's
        dispatches are listed first and only what is really missing is created again.
        """
        wanted = target.dispatches(room, meta, self._settings.agent_name)
        missing: list[api.CreateAgentDispatchRequest] | None = None
        for attempt in range(self._attempts):
            if missing is None:
                missing = await self._missing(room, wanted)
            try:
                while missing:
                    await self._dispatch(missing[0])
                    missing.pop(0)
                return
            except Exception as exc:
                if not _transient(exc) or attempt == self._attempts - 1:
                    raise
                missing = None  # we cannot know whether the failed one landed: ask livekit-server
                await asyncio.sleep(min(3.0, 0.2 * 2**attempt))

    async def _create_room(self, room: str, meta: JobMetadata) -> None:
        # agents: our dispatches, and (never empty) what keeps livekit-server's automatic one out (above)
        agents = [api.RoomAgentDispatch(agent_name=d.agent_name, metadata=d.metadata)
                  for d in target.dispatches(room, meta, self._settings.agent_name)]
        req = api.CreateRoomRequest(name=room, empty_timeout=self._settings.room_empty_timeout_s,
                                    departure_timeout=DEPARTURE_TIMEOUT_S, metadata=contracts.encode(meta).decode(),
                                    agents=agents)
        await self._call("create_room", lambda: self._api.room.create_room(req))

    async def _dispatch(self, req: api.CreateAgentDispatchRequest) -> None:
        # one try: a retry is decided by _dispatches after listing what landed
        await self._call("create_dispatch", lambda: self._api.agent_dispatch.create_dispatch(req), attempts=1)

    async def delete(self, room: str) -> None:
        try:
            await self._call("delete_room", lambda: self._api.room.delete_room(api.DeleteRoomRequest(room=room)))
        except api.TwirpError as exc:
            if not _not_found(exc):
                raise

    async def agent_count(self, room: str) -> int:
        """Agent participants now in ``room`` (0 if the room is gone), crosstalk's simulated customer
        included: a standard participant carrying ``lk.simulator`` (target batches, worker/simulator/customer.py)."""
        try:
            res = await self._call("list_participants", lambda: self._api.room.list_participants(
                api.ListParticipantsRequest(room=room)))
        except api.TwirpError as exc:
            if _not_found(exc):
                return 0
            raise
        return sum(1 for p in res.participants
                   if p.kind == api.ParticipantInfo.Kind.AGENT or ATTR_SIMULATOR in p.attributes)

    async def names(self) -> list[str]:
        res = await self._call("list_rooms", lambda: self._api.room.list_rooms(api.ListRoomsRequest()))
        return [r.name for r in res.rooms]

    async def unplaced(self, room: str) -> bool:
        """True when livekit-server gave one of the room's dispatches to no worker at all.

        livekit-server appends a job to a dispatch's ``state.jobs`` only once a worker accepted
        it (pkg/rtc/room.go ``handleNewJobs``); a dispatch that every worker refused (full, load at
        ``agents.target_load``) or that found no worker keeps an empty list, and is never retried.
        """
        existing = await self._call("list_dispatch", lambda: self._api.agent_dispatch.list_dispatch(room))
        ours = [d for d in existing if d.agent_name == self._settings.agent_name]
        return any(not d.state.jobs for d in ours)


class RoomEffects:
    """LiveKit calls that follow events already in the log, in the background, in order per room.

    A delete never overtakes the create it follows. An open that fails decides nothing here: it
    is reported as a :class:`DispatchFailed` message through ``report`` (the handler table).
    """

    def __init__(self, rooms: Rooms, report: Callable[[DispatchFailed], Awaitable[object]]) -> None:
        self.rooms = rooms
        self._report = report
        self._chains: dict[str, asyncio.Task[None]] = {}

    def open(self, ev: ConversationDispatched, meta: JobMetadata, *, resume: bool = False) -> None:
        """Create the attempt's room and dispatches (``resume``: only what a crash left missing)."""
        self._chain(ev.room, self._open(ev, meta, resume))

    def delete(self, room: str) -> None:
        self._chain(room, self._delete(room))

    async def _open(self, ev: ConversationDispatched, meta: JobMetadata, resume: bool) -> None:
        try:
            await (self.rooms.ensure if resume else self.rooms.open)(ev.room, meta)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("could not open room", extra=kv(room=ev.room, error=error))
            await self._report(DispatchFailed(batch_id=ev.batch_id, conversation_id=ev.conversation_id,
                                              attempt=ev.attempt, error=error))

    async def _delete(self, room: str) -> None:
        try:
            await self.rooms.delete(room)
        except Exception as exc:
            log.warning("could not delete room", extra=kv(room=room, error=f"{type(exc).__name__}: {exc}"))

    def _chain(self, room: str, coro: Awaitable[None]) -> None:
        prev = self._chains.get(room)

        async def chained() -> None:
            if prev is not None:
                await asyncio.wait([prev])
            await coro

        task = asyncio.create_task(chained())
        self._chains[room] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._chains.get(room) is t:
                del self._chains[room]

        task.add_done_callback(done)

    async def close(self, timeout: float) -> None:
        """Let pending calls finish for up to ``timeout`` seconds, then cancel the rest."""
        pending = list(self._chains.values())
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for task in list(self._chains.values()):
            task.cancel()
