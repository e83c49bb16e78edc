"""The dispatcher's handler table: every input, decoded, to the handler that decides on it.

A handler reads the batch's state from the log (:mod:`.eventlog`), asks the
pure core (:mod:`.core`, :mod:`.validate`) for the events that follow, appends
them, and only then runs their effects: metrics, logs and LiveKit rooms
(:class:`~.rooms.RoomEffects`). An effect never calls a decision; a room that
could not be opened comes back as a :class:`~.core.DispatchFailed` message
through :meth:`Dispatcher.handle`, like any other input. Handlers run one at a
time, so each decides on the state the previous one left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import JetStreamContext

from shared import bus, capacity, contracts, scenarios, subjects
from shared.config import Settings
from shared.contracts import (
    AgentJoined,
    BatchAccepted,
    BatchCancelled,
    BatchEvent,
    BatchFinished,
    BatchRejected,
    BatchReply,
    BatchSpec,
    ConversationDispatched,
    ConversationEnded,
    ConversationJoined,
    ConversationSettled,
    DispatcherStatus,
    WorkerCapacity,
)
from shared.log import kv
from shared.metrics import DispatcherMetrics, reason_label

from . import cancel, core
from .cancel import CancelReceived
from .core import CommandReceived, DispatchDue, DispatchFailed, RoomCount, Tick, Watch
from .eventlog import BatchLog
from .rooms import RoomEffects, Rooms
from .state import BatchState, Conversation, batch_of, job_metadata, parse_room, room_name
from .validate import Rejection, validate

log = logging.getLogger(__name__)

# Each retry follows a write another history won; this bound only stops a runaway.
DECIDE_TRIES = 3


class Dispatcher:
    def __init__(self, settings: Settings, js: JetStreamContext, batch_log: BatchLog, rooms: Rooms,
                 metrics: DispatcherMetrics) -> None:
        self.settings = settings
        self.js = js
        self.log = batch_log
        self.metrics = metrics
        self.scenarios = scenarios.library()
        self.effects = RoomEffects(rooms, self.handle)
        self.watches: dict[tuple[str, int], Watch] = {}
        # Live workers' capacity heartbeats (shared/capacity.py); admission plans with fleet.view().
        self.fleet = capacity.Fleet(settings.agent_name)
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()  # something changed that may let the next conversation in
        self.handlers: dict[type, Callable[[Any], Awaitable[Any]]] = {
            CommandReceived: self.on_command,
            CancelReceived: self.on_cancel,
            AgentJoined: self.on_joined,
            ConversationEnded: self.on_ended,
            DispatchDue: self.on_dispatch_due,
            Tick: self.on_tick,
            RoomCount: self.on_room_count,
            DispatchFailed: self.on_dispatch_failed,
            WorkerCapacity: self.on_capacity,
        }

    async def handle(self, message: object) -> Any:
        """Run ``message``'s handler. A heartbeat touches only the fleet: it never waits behind the log."""
        handler = self.handlers[type(message)]
        if isinstance(message, WorkerCapacity):
            return await handler(message)
        async with self.lock:
            return await handler(message)

    # ----------------------------------------------------------------- handlers

    async def on_command(self, msg: CommandReceived) -> BatchReply:
        verdict = msg.command if isinstance(msg.command, Rejection) else validate(
            msg.command, self.settings, self.scenarios, received_at=msg.received_at,
            seed=f"{msg.seq}:{msg.received_at:.9f}")
        if isinstance(verdict, Rejection):
            return await self._reject(verdict, msg.seq)
        return await self._accept(verdict)

    async def _reject(self, r: Rejection, cmd_seq: int) -> BatchReply:
        self.metrics.batch_commands.labels("rejected").inc()
        log.info("batch rejected", extra=kv(batch_id=r.batch_id, field=r.field, reason=r.reason))
        await bus.publish(self.js, subjects.BATCH_REJECTED,
                          BatchRejected(batch_id=r.batch_id, field=r.field, reason=r.reason, at=time.time()),
                          msg_id=f"rejected-{cmd_seq}")
        return BatchReply(accepted=False, batch_id=r.batch_id, field=r.field, reason=r.reason)

    async def _accept(self, spec: BatchSpec) -> BatchReply:
        bid = spec.batch_id
        ev = BatchAccepted(spec=spec, at=time.time())
        fresh = bid not in self.log.batches and await self._append(ev)
        if not fresh and (state := self.log.batches.get(bid)) is not None and state.started_at == ev.at:
            fresh = True  # our own write, retried after a lost ack
        if fresh:
            self.metrics.batch_commands.labels("accepted").inc()
            return BatchReply(accepted=True, batch_id=bid)
        self.metrics.batch_commands.labels("duplicate").inc()
        log.info("duplicate batch_id, the existing batch stands", extra=kv(batch_id=bid))
        return BatchReply(accepted=True, batch_id=bid, duplicate=True,
                          reason="batch_id already exists; the existing batch stands")

    async def on_cancel(self, msg: CancelReceived) -> BatchReply:
        """``batch.cancel``: accepted once (BatchCancelled in the batch's log), repeated idempotently."""
        if isinstance(msg.command, Rejection):
            log.info("batch.cancel rejected", extra=kv(field=msg.command.field, reason=msg.command.reason))
            return BatchReply(accepted=False, field=msg.command.field, reason=msg.command.reason)
        bid = msg.command.batch_id
        for _ in range(DECIDE_TRIES):
            reply, events = cancel.on_cancel(self.log.batches.get(bid), bid, time.time())
            if not events or await self._append(events[0]):
                break
        log.info("batch.cancel", extra=kv(batch_id=bid, accepted=reply.accepted, duplicate=reply.duplicate,
                                          field=reply.field, reason=reply.reason))
        return reply

    async def on_joined(self, ev: AgentJoined) -> None:
        await self._decide(ev.batch_id, self._watched(
            (ev.conversation_id, ev.attempt), lambda s, w: core.on_agent_joined(s, ev, w)))

    async def on_ended(self, ev: ConversationEnded) -> None:
        await self._decide(ev.batch_id, lambda s: core.on_conversation_ended(s, ev, time.time(), self.settings))

    async def on_dispatch_failed(self, msg: DispatchFailed) -> None:
        await self._decide(msg.batch_id, lambda s: core.on_dispatch_failed(s, msg, time.time(), self.settings))

    async def on_room_count(self, msg: RoomCount) -> None:
        await self._decide(msg.batch_id, self._watched(
            (msg.conversation_id, msg.attempt), lambda s, w: core.on_liveness(s, msg, w, time.time(), self.settings)))

    async def on_tick(self, msg: Tick) -> None:
        for state in self.log.running():
            await self._decide(state.spec.batch_id, lambda s: core.on_tick(s, msg.now, self.settings, msg.unplaced))

    async def on_dispatch_due(self, _: DispatchDue) -> bool:
        """Dispatch the next conversation admission allows; whether one was dispatched."""
        view = self.fleet.view(asyncio.get_running_loop().time())
        ev = core.plan_dispatch(self.log.running(), self.settings.max_concurrency, time.time(),
                                self.settings.max_joining, capacity=view)
        return ev is not None and await self._append(ev)

    async def on_capacity(self, hb: WorkerCapacity) -> None:
        now = asyncio.get_running_loop().time()
        known = {w.worker_id for w in self.fleet.live(now)}
        if self.fleet.observe(hb, now):
            if hb.worker_id not in known:
                log.info("worker announced", extra=kv(worker_id=hb.worker_id, capacity=hb.capacity, free=hb.free,
                                                      livekit_worker_id=hb.livekit_worker_id))
            self.wake.set()

    # ----------------------------------------------------------------- decide, append, then effects

    async def _decide(self, bid: str, decide: Callable[[BatchState], list[BatchEvent]]) -> None:
        """Append what ``decide`` returns for the batch's state; when the log moved under us, decide again."""
        for _ in range(DECIDE_TRIES):
            state = self.log.batches.get(bid)
            if state is None:
                return
            for ev in decide(state):
                if not await self._append(ev):
                    break
            else:
                return

    def _watched(self, key: tuple[str, int], step: Callable[[BatchState, Watch], tuple[Watch, list[BatchEvent]]],
                 ) -> Callable[[BatchState], list[BatchEvent]]:
        """A decision that also reads and updates the attempt's :class:`Watch`."""
        def decide(state: BatchState) -> list[BatchEvent]:
            watch = self.watches.get(key, Watch())
            new, events = step(state, watch)
            if new != watch:
                self.watches[key] = new
            return events
        return decide

    async def _append(self, ev: BatchEvent) -> bool:
        """Append ``ev``, then run its effects; False when it did not apply (the log may have been re-read)."""
        before = self.log.batches.get(batch_of(ev))
        state = await self.log.append(ev)
        if state is None:
            self._reloaded(before, self.log.batches.get(batch_of(ev)))
            return False
        self._effects(ev, state)
        return True

    def _effects(self, ev: BatchEvent, state: BatchState) -> None:
        """Metrics, watches and LiveKit rooms of an event that is now in the log."""
        m = self.metrics
        if isinstance(ev, BatchAccepted):
            fields = {f: getattr(ev.spec, f) for f in ev.spec.__struct_fields__ if f != "scenarios"}
            log.info("batch accepted", extra=kv(**fields, scenarios=[s.id for s in ev.spec.scenarios]))
        elif isinstance(ev, ConversationDispatched):
            m.attempts.inc()
            self.effects.open(ev, job_metadata(state.spec, ev.conversation_id, ev.attempt))
        elif isinstance(ev, ConversationJoined):
            m.dispatch_to_join.observe(ev.join_seconds)
        elif isinstance(ev, ConversationSettled):
            label = reason_label(ev.reason)
            if ev.retry:
                m.retries.labels(label).inc()
            else:
                m.conversations.labels(ev.outcome, label).inc()
            self.watches.pop((ev.conversation_id, ev.attempt), None)
            self.effects.delete(room_name(ev.conversation_id, ev.attempt))
            log.info("conversation settled", extra=kv(
                batch_id=ev.batch_id, conversation_id=ev.conversation_id, attempt=ev.attempt,
                outcome=ev.outcome, reason=ev.reason, retry=ev.retry))
        elif isinstance(ev, BatchCancelled):
            log.info("batch cancelled: nothing more is dispatched", extra=kv(
                batch_id=ev.batch_id, never_started=ev.never_started, in_flight=ev.in_flight))
        elif isinstance(ev, BatchFinished):
            m.batches.labels(ev.status).inc()
            log.info("batch finished", extra=kv(batch_id=ev.batch_id, status=ev.status, requested=ev.requested,
                                                completed=ev.completed, failed=ev.failed, cancelled=ev.cancelled))
        self.gauges()
        self.wake.set()

    def _reloaded(self, old: BatchState | None, new: BatchState | None) -> None:
        """The room effects of events another history appended: close rooms that ended, open those begun."""
        if new is None or new is old:
            return
        before = {old.convs[c].room for c in old.in_flight} if old else set()
        after = {new.convs[c].room: new.convs[c] for c in new.in_flight}
        for room in before - set(after):
            self.effects.delete(room)
        for room, conv in after.items():
            if room not in before:
                self._resume(new, conv)
        self.gauges()
        self.wake.set()

    def _resume(self, state: BatchState, conv: Conversation) -> None:
        ev = ConversationDispatched(batch_id=state.spec.batch_id, conversation_id=conv.conversation_id,
                                    attempt=conv.attempt, room=conv.room, at=conv.dispatched_at)
        self.effects.open(ev, job_metadata(state.spec, conv.conversation_id, conv.attempt), resume=True)

    def resume(self, room_names: list[str]) -> None:
        """At start: delete our rooms whose attempt is over; recreate what a crash left half-opened."""
        live = {s.convs[c].room: (s, s.convs[c]) for s in self.log.running() for c in s.in_flight}
        for name in room_names:
            parsed = parse_room(name)
            if parsed and name not in live and parsed[0].rsplit("-", 1)[0] in self.log.batches:
                self.effects.delete(name)
        for state, conv in live.values():
            if conv.joined_at is None:
                self._resume(state, conv)
        if live:
            log.info("resumed in-flight conversations", extra=kv(count=len(live)))

    # ----------------------------------------------------------------- read side

    def gauges(self) -> None:
        running = self.log.running()
        self.metrics.batches_running.set(len(running))
        self.metrics.in_flight.set(sum(len(s.in_flight) for s in running))
        self.metrics.pending.set(sum(s.pending for s in running))

    def status(self, now: float) -> DispatcherStatus:
        running = self.log.running()
        view = self.fleet.view(now)
        batches = {s.spec.batch_id: contracts.BatchQueue(in_flight=len(s.in_flight), queued=core.queued(s),
                                                         pending=s.pending) for s in running}
        return DispatcherStatus(workers=view.workers, capacity=view.capacity, free=view.free,
                                reserved=core.reserved(running, view),
                                queued=sum(b.queued for b in batches.values()), batches=batches, at=time.time())
