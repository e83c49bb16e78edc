"""The sink's NATS wiring: four durable pull consumers, one handler each (the table in
:class:`Sink`), over two pure folds (``core``) and the files (``files``).

* ``<durable>-conv`` (turns, conversation ends) -> :meth:`.turns.Turns.on_events`: transcript
  files, group-committed per fetch, acked once fsynced (``turns.py``).
* ``<durable>-batch`` (``batch.evt.*``) -> :meth:`Sink.on_batch_event`: ``batch.json``, rewritten
  atomically at most every ``flush_interval_s`` and acked after the rewrite (``docs.py``). A
  ``BatchFinished`` waits (nak with delay, bounded) until every completed conversation's
  transcript holds its turns.
* ``<durable>-lk`` (webhooks) and ``<durable>-roles`` (the grant log) -> :meth:`Sink.on_room_fact`:
  the room audit in ``batch.json`` (``audit.py``).

Every message is decoded at the edge, as its consumer's type; one that does not decode is
dropped (counted, logged, acked). One sink per durable name: two sinks sharing one would
interleave writes to the same files. Run more with other ``CROSSTALK_SINK_DURABLE`` and data dirs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, streams, subjects
from shared.config import Settings
from shared.contracts import (
    BatchEvent,
    BatchFinished,
    BatchJudged,
    ContractError,
    ConversationEvent,
    LeaseEvent,
    RoomWebhook,
    decode,
    decode_event,
)
from shared.log import kv
from shared.metrics import SinkMetrics

from . import core, files
from .docs import Docs
from .fencing import LeaseLog
from .recordings import Recordings
from .turns import Turns
from .wire import drop, kind_of, subject_problem

log = logging.getLogger("sink")

Handler = Callable[[list[tuple[Any, Msg]]], Awaitable[None]]


@dataclass(frozen=True)
class Tuning:
    """The sink's own knobs (not configuration: tests shorten them)."""

    fetch_batch: int = 256
    # Held (out-of-order) turns count against this; far above what a fetch plus the
    # gaps of a few hundred live conversations need.
    max_ack_pending: int = 8192
    flush_interval_s: float = 0.25
    finish_retry_s: float = 1.0
    finish_max_deliveries: int = 60
    lag_interval_s: float = 5.0
    io_threads: int = 8
    max_idle_transcripts: int = 20_000


def consumers(settings: Settings, tuning: Tuning = Tuning()) -> streams.SinkConsumers:
    return streams.sink_consumers(settings.sink_durable, deliver=settings.sink_deliver,
                                  ack_wait_s=settings.sink_ack_wait_s, max_ack_pending=tuning.max_ack_pending)


class Route(NamedTuple):
    consumer: streams.Durable
    decode: Callable[[bytes], Any]  # raises ContractError
    handle: Handler


def each(handler: Callable[[Any, Msg], Awaitable[None]]) -> Handler:
    """A per-message handler over a fetched batch, in order."""
    async def run(events: list[tuple[Any, Msg]]) -> None:
        for event, msg in events:
            await handler(event, msg)
    return run


class Sink:
    def __init__(self, js: JetStreamContext, settings: Settings, metrics: SinkMetrics,
                 tuning: Tuning = Tuning()) -> None:
        self.js = js
        self.tuning = tuning
        self.metrics = metrics
        self.consumers = c = consumers(settings, tuning)
        self.io = files.Io(settings.data_dir, tuning.io_threads)
        self.docs = Docs(self.io)
        self.turns = Turns(self.io, self.docs, LeaseLog(js._nc), metrics, tuning.max_idle_transcripts)
        self.turns.recordings = Recordings(js, self.io, self.docs, metrics)
        # The handler table: each consumer, what its messages decode to, and who handles them.
        self.routes = (
            Route(c.conv, partial(decode_event, union=ConversationEvent), self.turns.on_events),
            Route(c.batch, partial(decode_event, union=BatchEvent), each(self.on_batch_event)),
            Route(c.lk, partial(decode, typ=RoomWebhook), each(self.on_room_fact)),
            Route(c.roles, partial(decode, typ=LeaseEvent), each(self.on_room_fact)),
        )
        self._subs: list[JetStreamContext.PullSubscription] = []

    # ------------------------------------------------------------------ handlers

    async def on_batch_event(self, event: BatchEvent, msg: Msg) -> None:
        """``batch.evt.<id>`` into ``batch.json``; a ``BatchFinished`` waits for the transcripts."""
        self.metrics.events.labels(kind_of(event)).inc()
        if isinstance(event, BatchJudged):  # the judge's word, in judged.json: nothing for batch.json
            await bus.ack([msg])
            return
        batch_id = core.batch_of(event)
        problem = core.event_problem(event) or subject_problem(msg.subject, lambda: subjects.batch_events(batch_id))
        if problem:
            drop(self.metrics, msg, *problem)
            await bus.ack([msg])
            return
        short: dict[str, int] = {}
        if isinstance(event, BatchFinished):
            short = await self.turns.missing(batch_id)
            if short:
                if msg.metadata.num_delivered < self.tuning.finish_max_deliveries:
                    await bus.nak([msg], delay=self.tuning.finish_retry_s)
                    return
                # Never "completed" with transcripts short: those conversations are failed, by name.
                log.error("batch finished with transcripts still short: failing those conversations",
                          extra=kv(batch_id=batch_id, conversations=sorted(short)[:20], count=len(short)))
                self.metrics.incomplete.inc(len(short))
            elif msg.metadata.num_delivered < self.tuning.finish_max_deliveries and await self._recordings_due(batch_id):
                # the dispatcher settles on the first end reported; the other listener's channel of a
                # voice recording may still be on its way: wait for it (bounded) as for transcripts,
                # rather than mark a conversation recording_missing that a second later is whole
                await bus.nak([msg], delay=self.tuning.finish_retry_s)
                return
        try:
            await self.docs.apply(event, msg)  # acked by the flush that writes it
            if short:
                self.docs.mark_incomplete(batch_id, short)
        except ContractError as exc:
            drop(self.metrics, msg, exc.field, exc.reason)
            await bus.ack([msg])

    async def _recordings_due(self, batch_id: str) -> bool:
        try:
            return bool(core.recordings_missing(await self.docs.get(batch_id)))
        except ContractError:
            return False

    async def on_room_fact(self, fact: RoomWebhook | LeaseEvent, msg: Msg) -> None:
        """A webhook (``lk.room.*``) or lease event (``roles.*``) into its conversation's room audit."""
        self.metrics.events.labels(fact.event if isinstance(fact, RoomWebhook) else "lease").inc()
        target = core.audit_target(fact.room)
        if target is None:  # not a conversation room: nothing to audit
            await bus.ack([msg])
            return
        seq = msg.metadata.sequence.stream if isinstance(fact, LeaseEvent) else None
        try:
            await self.docs.audit(target[0], fact, seq, msg)  # acked by the flush that writes it
        except ContractError as exc:
            drop(self.metrics, msg, exc.field, exc.reason)
            await bus.ack([msg])

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._subs = [await streams.bind(self.js, route.consumer) for route in self.routes]

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish the batch in hand and flush."""
        assert self._subs, "call start() first"
        loops = [asyncio.create_task(self._consume(stop, sub, route))
                 for sub, route in zip(self._subs, self.routes, strict=True)]
        background = [
            asyncio.create_task(self._every(stop, self.tuning.flush_interval_s, self.docs.flush)),
            asyncio.create_task(self._every(stop, self.tuning.lag_interval_s, self.poll_lag)),
        ]
        try:
            await asyncio.gather(*loops)
        finally:
            stop.set()
            # The periodic jobs see ``stop`` and end after their current run (a flush
            # cut short would leave acks unsent); wait for them rather than cancel.
            _, slow = await asyncio.wait(background, timeout=30)
            for t in slow:
                t.cancel()
            await self.docs.flush()
            self.io.close()
            # A pull subscription's queue only empties through fetch(): unsubscribe so
            # that draining the connection does not wait out its whole timeout.
            for sub in self._subs:
                try:
                    await sub.unsubscribe()
                except nats.errors.Error as exc:
                    log.debug("unsubscribe failed", extra=kv(error=repr(exc)))

    async def _consume(self, stop: asyncio.Event, sub: JetStreamContext.PullSubscription, route: Route) -> None:
        while not stop.is_set():
            msgs = await bus.fetch(sub, self.tuning.fetch_batch)
            if not msgs:
                continue
            try:
                events: list[tuple[Any, Msg]] = []
                bad: list[Msg] = []
                for msg in msgs:
                    try:
                        events.append((route.decode(msg.data), msg))
                    except ContractError as exc:
                        drop(self.metrics, msg, exc.field, exc.reason, bad)
                await bus.ack(bad)
                if events:
                    await route.handle(events)
            except Exception:
                # Unacked messages come back after ack_wait; keep consuming.
                log.exception("batch of messages failed", extra=kv(count=len(msgs)))
                await asyncio.sleep(1.0)

    async def _every(self, stop: asyncio.Event, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        while not stop.is_set():
            try:
                await job()
            except Exception:
                log.exception("periodic job failed", extra=kv(job=getattr(job, "__name__", repr(job))))
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    async def poll_lag(self) -> None:
        lag = 0
        for sub in self._subs:
            try:
                info = await sub.consumer_info()
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("consumer info failed", extra=kv(error=repr(exc)))
                return
            lag += (info.num_pending or 0) + (info.num_ack_pending or 0)
        self.metrics.lag.set(lag)
