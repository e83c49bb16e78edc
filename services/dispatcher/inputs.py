"""The dispatcher's inputs: wire messages and timers, decoded and handed to the handler table.

- ``batch.start`` and ``batch.cancel`` through the durable pull consumer
  ``dispatcher-cmds`` on ``BATCH_CMDS`` (so a core ``nats pub`` while the
  dispatcher is down is not lost), plus a core subscription per subject that
  answers requests with the verdict the durable consumer reached for the same
  body on the same subject (a stored message has no reply subject, see
  :mod:`.verdicts`).
- ``conv.*.*.joined`` / ``conv.*.*.ended`` through the durable pull consumer
  ``dispatcher-conv`` (see :func:`.main.conv_consumer`).
- workers' capacity heartbeats, and four timers: dispatch pacing, deadlines
  (with livekit-server's placement of overdue dispatches), liveness (agents
  per joined room), and ``dispatcher.status``.
Each loop only decodes and observes; :meth:`.handlers.Dispatcher.handle` decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, contracts, subjects
from shared.contracts import (
    BatchReply,
    ContractError,
    ConversationEvent,
    StartBatch,
    WorkerCapacity,
)
from shared.log import kv

from .cancel import CancelReceived, decode_cancel
from .core import CommandReceived, DispatchDue, RoomCount, Tick, TokenBucket, join_overdue
from .handlers import Dispatcher
from .rooms import Rooms
from .validate import Rejection, undecodable
from .verdicts import Verdicts

log = logging.getLogger(__name__)
T = TypeVar("T")

REPLY_TIMEOUT_S = 10.0
BUSY = "dispatcher busy, the command is queued"
TICK_S = 0.25
LIVENESS_INTERVAL_S = 3.0
STATUS_INTERVAL_S = 1.0
Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def decode_command(msg: Msg) -> CommandReceived | CancelReceived:
    """A stored ``batch.start`` or ``batch.cancel`` as the handlers take it: decoded, or refused naming the field."""
    if msg.subject == subjects.BATCH_CANCEL:
        return CancelReceived(command=decode_cancel(msg.data), seq=msg.metadata.sequence.stream)
    received_at = msg.metadata.timestamp.timestamp()
    return CommandReceived(command=decode_start(msg.data), seq=msg.metadata.sequence.stream, received_at=received_at)


def decode_start(body: bytes) -> StartBatch | Rejection:
    try:
        return contracts.decode(body, StartBatch, max_bytes=bus.MAX_BODY)
    except ContractError as exc:
        return undecodable(exc, _claimed_batch_id(body) if len(body) <= bus.MAX_BODY else None)


def _claimed_batch_id(body: bytes) -> str | None:
    """The batch_id a bad command names, if it is a valid id (never echo an invalid one)."""
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    value = raw.get("batch_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and contracts.is_id(value) else None


class Inputs:
    """The loops that turn wire messages and timers into messages for the handler table."""

    def __init__(self, d: Dispatcher, rooms: Rooms, nc: Client, cmd_sub: JetStreamContext.PullSubscription,
                 conv_sub: JetStreamContext.PullSubscription) -> None:
        self.d, self.rooms, self.nc = d, rooms, nc
        self.cmd_sub, self.conv_sub = cmd_sub, conv_sub
        # one per command subject: a cancel's body can be byte for byte a valid start's ({"batch_id": ...})
        self.verdicts = {subjects.BATCH_START: Verdicts(), subjects.BATCH_CANCEL: Verdicts()}
        self.bucket = TokenBucket(rate=d.settings.dispatch_rate)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def commands(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for msg in await bus.fetch(self.cmd_sub, 16):
                reply = await self.d.handle(decode_command(msg))
                self.verdicts[msg.subject].settle(msg.data, reply)
                await msg.ack()

    async def on_request(self, msg: Msg) -> None:
        if msg.reply:
            task = asyncio.create_task(self._answer(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        reply = await self.verdicts[msg.subject].wait(msg.data, REPLY_TIMEOUT_S)
        if reply is None:
            reply = BatchReply(accepted=False, reason=BUSY)
        with contextlib.suppress(Exception):
            await msg.respond(contracts.encode(reply))

    async def conversations(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for msg in await bus.fetch(self.conv_sub, 128):
                try:
                    ev = contracts.decode_event(msg.data, ConversationEvent)
                except ContractError as exc:
                    log.warning("bad conversation event ignored", extra=kv(
                        subject=msg.subject, field=exc.field, reason=exc.reason))
                else:
                    if type(ev) in self.d.handlers:  # joined and ended; turns are the sink's
                        await self.d.handle(ev)
                await msg.ack()

    async def on_capacity(self, msg: Msg) -> None:
        try:
            hb = contracts.decode(msg.data, WorkerCapacity)
        except ContractError as exc:
            log.warning("bad capacity heartbeat ignored", extra=kv(subject=msg.subject, field=exc.field,
                                                                   reason=exc.reason))
            return
        await self.d.handle(hb)

    async def pacing(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            delay = self.bucket.delay(loop.time())
            if delay > 0:
                await asyncio.sleep(delay)
            self.d.wake.clear()
            if await self.d.handle(DispatchDue()):
                self.bucket.take(loop.time())
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.d.wake.wait(), 1.0)

    async def deadlines(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            now = time.time()
            overdue = [c.room for s in self.d.log.running() for c in join_overdue(s, now, self.d.settings)]
            await self.d.handle(Tick(now=now, unplaced=await self._unplaced(overdue) if overdue else frozenset()))

    async def _unplaced(self, rooms: list[str]) -> frozenset[str]:
        """The rooms among ``rooms`` with a dispatch livekit-server placed on no worker (no_capacity).
        A room that cannot be checked counts as placed (its attempt becomes a join_timeout)."""
        found = await _ask_each(rooms, self.rooms.unplaced, at_once=8, what="placement check")
        return frozenset(r for r, bad in zip(rooms, found, strict=True) if bad)

    async def liveness(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            joined = [(s.spec.batch_id, c) for s in self.d.log.running() for c in (s.convs[i] for i in s.in_flight)
                      if c.joined_at is not None]
            counts = await _ask_each([c.room for _, c in joined], self.rooms.agent_count, at_once=16,
                                     what="liveness check")
            for (bid, conv), agents in zip(joined, counts, strict=True):
                if agents is not None:
                    await self.d.handle(RoomCount(batch_id=bid, conversation_id=conv.conversation_id,
                                                  attempt=conv.attempt, agents=agents))

    async def status(self, stop: asyncio.Event) -> None:
        """Expire silent workers, update the capacity gauges, publish ``dispatcher.status``."""
        loop = asyncio.get_running_loop()
        fleet, m = self.d.fleet, self.d.metrics
        while not stop.is_set():
            for worker_id in fleet.expire(loop.time()):
                log.warning("worker heartbeat expired: its slots leave admission",
                            extra=kv(worker_id=worker_id, expiry_s=fleet.expiry_s))
            st = self.d.status(loop.time())
            m.workers.set(st.workers)
            m.capacity.set(st.capacity)
            m.free.set(st.free)
            m.reserved.set(st.reserved)
            m.queued.set(st.queued)
            with contextlib.suppress(Exception):
                await self.nc.publish(subjects.DISPATCHER_STATUS, contracts.encode(st))
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def serve(self, stop: asyncio.Event) -> None:
        subs = [await self.nc.subscribe(subjects.BATCH_START, cb=self.on_request),
                await self.nc.subscribe(subjects.BATCH_CANCEL, cb=self.on_request),
                await self.nc.subscribe(subjects.WORKER_CAPACITY_ALL, cb=self.on_capacity)]
        loops: list[Loop] = [self.commands, self.conversations, self.pacing, self.deadlines, self.liveness,
                             self.status]
        tasks = [asyncio.create_task(_guard(fn, stop), name=fn.__name__) for fn in loops]
        s = self.d.settings
        log.info("dispatcher running", extra=kv(agent_name=s.agent_name, max_concurrency=s.max_concurrency,
                                                dispatch_rate=s.dispatch_rate))
        try:
            await stop.wait()
        finally:
            for sub in subs:
                await sub.unsubscribe()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.d.effects.close(timeout=5)
            for t in list(self._tasks):
                t.cancel()


async def _guard(fn: Loop, stop: asyncio.Event) -> None:
    """Keep a loop alive through unexpected errors (NATS hiccups); log and back off."""
    while not stop.is_set():
        try:
            await fn(stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("loop failed, restarting", extra=kv(loop=fn.__name__))
            await asyncio.sleep(1.0)


async def _ask_each(
    rooms: list[str], ask: Callable[[str], Awaitable[T]], *, at_once: int, what: str
) -> list[T | None]:
    """``ask`` about every room, ``at_once`` at a time; a room whose question failed is logged
    ("<what> failed") and answered with None."""
    limit = asyncio.Semaphore(at_once)

    async def one(room: str) -> T | None:
        async with limit:
            try:
                return await ask(room)
            except Exception as exc:
                log.warning(f"{what} failed", extra=kv(room=room, error=str(exc)))
                return None

    return await asyncio.gather(*(one(r) for r in rooms))
