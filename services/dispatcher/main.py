"""The dispatcher's NATS wiring: consume commands and conversation events, perform the core's decisions.

Every decision comes from :mod:`services.dispatcher.core` as batch events. An
event is appended to ``batch.evt.<batch_id>`` with
``Nats-Expected-Last-Subject-Sequence`` (so only one writer's history exists),
then folded into the in-memory state, then its effects run: a dispatched
attempt opens its LiveKit room and two dispatches, a settled attempt deletes
its room. On start the dispatcher replays ``BATCH_EVENTS``, reconciles LiveKit
rooms with the replayed state and resumes every unfinished batch.

Inputs:
- ``batch.start`` through the durable pull consumer ``dispatcher-cmds`` on
  ``BATCH_CMDS`` (so a core ``nats pub`` while the dispatcher is down is not
  lost), plus a core subscription that answers requests with the verdict the
  durable consumer reached for the same body (a stored message has no reply
  subject).
- ``conv.*.*.joined`` / ``conv.*.*.ended`` through the durable pull consumer
  ``dispatcher-conv``; at start it is recreated to deliver from the oldest
  in-flight attempt, so joins seen before a crash are seen again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import hashlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, FetchTimeoutError, NotFoundError

from shared import bus, capacity, contracts, scenarios, streams, subjects
from shared.config import Settings
from shared.contracts import (
    AgentJoined,
    BatchAccepted,
    BatchEvent,
    BatchFinished,
    BatchRejected,
    BatchReply,
    BatchSpec,
    ContractError,
    ConversationDispatched,
    ConversationEnded,
    ConversationEvent,
    ConversationJoined,
    ConversationSettled,
    DispatcherStatus,
    WorkerCapacity,
)
from shared.log import kv
from shared.metrics import DispatcherMetrics, reason_label

from . import core
from .rooms import Rooms

log = logging.getLogger(__name__)

CMDS_STREAM = "BATCH_CMDS"
EVENTS_STREAM = "BATCH_EVENTS"
CONV_STREAM = "CONVERSATIONS"
COMMANDS_DURABLE = "dispatcher-cmds"
CONV_DURABLE = "dispatcher-conv"
REPLY_TIMEOUT_S = 10.0
BUSY = "dispatcher busy, the command is queued"
TICK_S = 0.25
LIVENESS_INTERVAL_S = 3.0
# Conversation events are re-read from this long before the oldest in-flight dispatch (clock skew).
REPLAY_MARGIN_S = 60.0
FETCH_TIMEOUT_S = 1.0
STATUS_INTERVAL_S = 1.0


def _fetch_errors() -> tuple[type[BaseException], ...]:
    return (NatsTimeoutError, FetchTimeoutError, asyncio.TimeoutError)


async def fetch(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    """``fetch`` that never stalls past its timeout (nats-py's can), and returns [] when idle."""
    try:
        return await asyncio.wait_for(sub.fetch(batch, timeout=FETCH_TIMEOUT_S), FETCH_TIMEOUT_S + 4)
    except _fetch_errors():
        return []


class UnreadableLog(RuntimeError):
    """A stored batch event this dispatcher cannot decode: its state would not be a fold of the log."""

    def __init__(self, subject: str, seq: int, exc: ContractError) -> None:
        super().__init__(f"{EVENTS_STREAM} sequence {seq} on {subject} cannot be decoded ({exc.field}: {exc.reason}); "
                         f"refusing to run on a log it cannot fold. Inspect it with "
                         f"`nats stream get {EVENTS_STREAM} {seq}`; run the crosstalk version that wrote it, "
                         f"or remove that message (`nats stream rmm {EVENTS_STREAM} {seq}`) knowingly")
        self.subject, self.seq, self.field, self.reason = subject, seq, exc.field, exc.reason


def batch_of(event: BatchEvent) -> str:
    return event.spec.batch_id if isinstance(event, BatchAccepted) else event.batch_id


class Verdicts:
    """Pairs a request on ``batch.start`` with the verdict the durable consumer reached on the same body.

    Bodies are matched by sha256, first come first served among identical
    bodies. A verdict that arrives before its request is kept for a few seconds.
    """

    def __init__(self, keep_s: float = 5.0) -> None:
        self._waiters: dict[str, deque[asyncio.Future[BatchReply]]] = defaultdict(deque)
        self._early: dict[str, deque[tuple[float, BatchReply]]] = defaultdict(deque)
        self._keep_s = keep_s

    @staticmethod
    def _key(body: bytes) -> str:
        return hashlib.sha256(body).hexdigest()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in list(self._early):
            q = self._early[key]
            while q and q[0][0] < now:
                q.popleft()
            if not q:
                del self._early[key]

    async def wait(self, body: bytes, timeout: float) -> BatchReply | None:
        key = self._key(body)
        self._expire()
        early = self._early.get(key)
        if early:
            reply = early.popleft()[1]
            if not early:
                del self._early[key]
            return reply
        fut: asyncio.Future[BatchReply] = asyncio.get_running_loop().create_future()
        self._waiters[key].append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            q = self._waiters.get(key)
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(fut)
                if not q:
                    del self._waiters[key]

    def settle(self, body: bytes, reply: BatchReply) -> None:
        key = self._key(body)
        q = self._waiters.get(key)
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(reply)
                return
        self._early[key].append((time.monotonic() + self._keep_s, reply))


class Dispatcher:
    def __init__(self, settings: Settings, nc: Client, js: JetStreamContext, rooms: Rooms,
                 metrics: DispatcherMetrics) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.rooms = rooms
        self.metrics = metrics
        self.scenarios = scenarios.library()
        self.batches: dict[str, core.BatchState] = {}
        self.running: set[str] = set()
        self.watches: dict[tuple[str, int], core.Watch] = {}
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.bucket = core.TokenBucket(rate=settings.dispatch_rate)
        self.verdicts = Verdicts()
        # Live workers' capacity heartbeats (shared/capacity.py); admission plans with fleet.view().
        self.fleet = capacity.Fleet(settings.agent_name)
        self._room_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- start-up

    async def start(self) -> None:
        events = await self._read_events(subjects.BATCH_EVENTS_ALL)
        self.batches = core.replay(events)
        self.running = {bid for bid, s in self.batches.items() if s.running}
        self._gauges()
        log.info("replayed batch events", extra=kv(events=len(events), batches=len(self.batches),
                                                   running=len(self.running)))
        await streams.ensure_consumer(self.js, CMDS_STREAM, streams.durable(
            COMMANDS_DURABLE, subjects.BATCH_START, ack_wait=60.0, max_ack_pending=64))
        self.cmd_sub = await self.js.pull_subscribe_bind(durable=COMMANDS_DURABLE, stream=CMDS_STREAM)
        self.conv_sub = await self._conv_consumer()
        await self._reconcile_rooms()

    async def _read_events(self, filter_subject: str) -> list[tuple[BatchEvent, int]]:
        """Every batch event on ``filter_subject``, in stream order, with its stream sequence."""
        cfg = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                             filter_subject=filter_subject, inactive_threshold=60.0, mem_storage=True)
        sub = await self.js.pull_subscribe(filter_subject, durable=None, stream=EVENTS_STREAM,
                                           config=cfg)
        out: list[tuple[BatchEvent, int]] = []
        try:
            remaining = (await sub.consumer_info()).num_pending or 0
            idle = 0
            while remaining > 0:
                msgs = await fetch(sub, min(remaining, 1000))
                if not msgs:
                    idle += 1
                    if idle > 30:
                        raise RuntimeError(f"replay of {filter_subject} stalled with {remaining} events left")
                    continue
                idle = 0
                for m in msgs:
                    remaining = m.metadata.num_pending
                    try:
                        out.append((contracts.decode_event(m.data, BatchEvent), m.metadata.sequence.stream))
                    except ContractError as exc:
                        # Skipping it would make the fold silently diverge from the log (a settled
                        # conversation run again, a batch that never finishes): refuse instead.
                        raise UnreadableLog(m.subject, m.metadata.sequence.stream, exc) from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    async def _conv_consumer(self) -> JetStreamContext.PullSubscription:
        """(Re)create ``dispatcher-conv`` to start at the oldest in-flight attempt (or at new events)."""
        oldest = min((s.convs[c].dispatched_at for s in self._running() for c in s.in_flight), default=None)
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(CONV_STREAM, CONV_DURABLE)
        cfg = ConsumerConfig(
            durable_name=CONV_DURABLE,
            filter_subjects=[subjects.CONV_JOINED_ALL, subjects.CONV_ENDED_ALL],
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=4000,
            deliver_policy=DeliverPolicy.NEW if oldest is None else DeliverPolicy.BY_START_TIME,
            opt_start_time=None if oldest is None else datetime.datetime.fromtimestamp(
                oldest - REPLAY_MARGIN_S, datetime.UTC),
        )
        await self.js.add_consumer(CONV_STREAM, cfg)
        return await self.js.pull_subscribe_bind(durable=CONV_DURABLE, stream=CONV_STREAM)

    async def _reconcile_rooms(self) -> None:
        """Delete our rooms whose attempt is over; recreate what a crash left half-opened."""
        try:
            names = await self.rooms.names()
        except Exception as exc:
            log.warning("could not list rooms at start", extra=kv(error=str(exc)))
            names = []
        live: dict[str, tuple[core.BatchState, core.Conversation]] = {}
        for state in self._running():
            for cid in state.in_flight:
                conv = state.convs[cid]
                live[conv.room] = (state, conv)
        for name in names:
            parsed = core.parse_room(name)
            if parsed and name not in live and parsed[0].rsplit("-", 1)[0] in self.batches:
                self._room_effect(name, self._delete_room(name))
        for room, (state, conv) in live.items():
            if conv.joined_at is None:
                ev = ConversationDispatched(batch_id=state.spec.batch_id, conversation_id=conv.conversation_id,
                                            attempt=conv.attempt, room=room, at=conv.dispatched_at)
                self._room_effect(room, self._open_room(ev, resume=True))
        if live:
            log.info("resumed in-flight conversations", extra=kv(count=len(live)))

    # ----------------------------------------------------------------- event log

    def _running(self) -> list[core.BatchState]:
        return [self.batches[b] for b in self.running]

    async def _emit(self, ev: BatchEvent) -> bool:
        """Append ``ev`` to its batch log, then fold it in and run its effects. Caller holds the lock.

        False when another history got there first (wrong last sequence): the
        batch is reloaded from the stream and the caller decides again.
        """
        bid = batch_of(ev)
        old = self.batches.get(bid)
        expected = old.seq if old else 0
        try:
            ack = await bus.publish(
                self.js, subjects.batch_events(bid), ev, msg_id=f"{bid}-{expected + 1}",
                headers={"Nats-Expected-Last-Subject-Sequence": str(expected)})
        except APIError as exc:
            if not bus.is_wrong_last_sequence(exc):
                raise
            log.warning("batch log moved under us, reloading", extra=kv(batch_id=bid, expected=expected))
            await self._reload(bid)
            return False
        if ack.duplicate:
            # Same Msg-Id already stored: an earlier write whose outcome we never learned. The log,
            # not this event, is the truth.
            await self._reload(bid)
            return False
        new = core.evolve(old, ev, ack.seq)
        if new is None:
            return False
        self.batches[bid] = new
        self._after(ev, new)
        return True

    async def _reload(self, bid: str) -> None:
        """Re-fold one batch from its log, and catch up on the room effects of events we did not apply."""
        old = self.batches.get(bid)
        new = core.replay(await self._read_events(subjects.batch_events(bid))).get(bid)
        if new is None:
            return
        self.batches[bid] = new
        if new.running:
            self.running.add(bid)
        else:
            self.running.discard(bid)
        before = {old.convs[c].room for c in old.in_flight} if old else set()
        after = {new.convs[c].room: new.convs[c] for c in new.in_flight}
        for room in before - set(after):
            self._room_effect(room, self._delete_room(room))
        for room, conv in after.items():
            if room not in before:
                ev = ConversationDispatched(batch_id=bid, conversation_id=conv.conversation_id,
                                            attempt=conv.attempt, room=room, at=conv.dispatched_at)
                self._room_effect(room, self._open_room(ev, resume=True))
        self._gauges()
        self.wake.set()

    async def _decide(self, bid: str, decide: Callable[[core.BatchState], list[BatchEvent]],
                      tries: int = 3) -> None:
        """Emit what ``decide`` returns for the batch's state; on a write conflict reload and decide again."""
        for _ in range(tries):
            state = self.batches.get(bid)
            if state is None:
                return
            for ev in decide(state):
                if not await self._emit(ev):
                    break
            else:
                return

    def _after(self, ev: BatchEvent, state: core.BatchState) -> None:
        """Metrics, watches and LiveKit effects of an event that is now in the log."""
        m = self.metrics
        if isinstance(ev, BatchAccepted):
            self.running.add(ev.spec.batch_id)
            log.info("batch accepted", extra=kv(**{f: getattr(ev.spec, f) for f in ev.spec.__struct_fields__}))
        elif isinstance(ev, ConversationDispatched):
            m.attempts.inc()
            self._room_effect(ev.room, self._open_room(ev))
        elif isinstance(ev, ConversationJoined):
            m.dispatch_to_join.observe(ev.join_seconds)
        elif isinstance(ev, ConversationSettled):
            label = reason_label(ev.reason)
            if ev.retry:
                m.retries.labels(label).inc()
            else:
                m.conversations.labels(ev.outcome, label).inc()
            self.watches.pop((ev.conversation_id, ev.attempt), None)
            room = core.room_name(ev.conversation_id, ev.attempt)
            self._room_effect(room, self._delete_room(room))
            log.info("conversation settled", extra=kv(
                batch_id=ev.batch_id, conversation_id=ev.conversation_id, attempt=ev.attempt,
                outcome=ev.outcome, reason=ev.reason, retry=ev.retry))
        elif isinstance(ev, BatchFinished):
            self.running.discard(ev.batch_id)
            m.batches.labels(ev.status).inc()
            log.info("batch finished", extra=kv(batch_id=ev.batch_id, status=ev.status, requested=ev.requested,
                                                completed=ev.completed, failed=ev.failed))
        self._gauges()
        self.wake.set()

    def _gauges(self) -> None:
        running = self._running()
        self.metrics.batches_running.set(len(running))
        self.metrics.in_flight.set(sum(len(s.in_flight) for s in running))
        self.metrics.pending.set(sum(s.pending for s in running))

    # ----------------------------------------------------------------- effects

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _room_effect(self, room: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run LiveKit calls for one room in order (a delete never overtakes the create it follows)."""
        prev = self._room_tasks.get(room)

        async def chained() -> None:
            if prev is not None:
                await asyncio.wait([prev])
            await coro

        task = self._spawn(chained())
        self._room_tasks[room] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._room_tasks.get(room) is t:
                del self._room_tasks[room]

        task.add_done_callback(done)

    async def _open_room(self, ev: ConversationDispatched, *, resume: bool = False) -> None:
        state = self.batches.get(ev.batch_id)
        if state is None:
            return
        meta = core.job_metadata(state.spec, ev.conversation_id, ev.attempt)
        try:
            if resume:
                await self.rooms.ensure(ev.room, meta)
            else:
                await self.rooms.open(ev.room, meta)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("could not open room", extra=kv(room=ev.room, error=error))
            async with self.lock:
                await self._decide(ev.batch_id, lambda s: core.on_dispatch_error(
                    s, ev.conversation_id, ev.attempt, error, time.time(), self.settings))

    async def _delete_room(self, room: str) -> None:
        try:
            await self.rooms.delete(room)
        except Exception as exc:
            log.warning("could not delete room", extra=kv(room=room, error=f"{type(exc).__name__}: {exc}"))

    # ----------------------------------------------------------------- commands

    async def _commands_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for msg in await fetch(self.cmd_sub, 16):
                await self._on_command(msg)
                await msg.ack()

    async def _on_command(self, msg: Msg) -> None:
        meta = msg.metadata
        received_at = meta.timestamp.timestamp()
        verdict = core.validate(msg.data, self.settings, self.scenarios, received_at=received_at,
                                seed=f"{meta.sequence.stream}:{received_at:.9f}", max_bytes=bus.MAX_BODY)
        if isinstance(verdict, core.Rejection):
            reply = await self._reject(verdict, meta.sequence.stream)
        else:
            async with self.lock:
                reply = await self._accept(verdict)
        self.verdicts.settle(msg.data, reply)

    async def _reject(self, r: core.Rejection, cmd_seq: int) -> BatchReply:
        self.metrics.batch_commands.labels("rejected").inc()
        log.info("batch rejected", extra=kv(batch_id=r.batch_id, field=r.field, reason=r.reason))
        await bus.publish(self.js, subjects.BATCH_REJECTED,
                          BatchRejected(batch_id=r.batch_id, field=r.field, reason=r.reason, at=time.time()),
                          msg_id=f"rejected-{cmd_seq}")
        return BatchReply(accepted=False, batch_id=r.batch_id, field=r.field, reason=r.reason)

    async def _accept(self, spec: BatchSpec) -> BatchReply:
        bid = spec.batch_id
        ev = BatchAccepted(spec=spec, at=time.time())
        fresh = bid not in self.batches and await self._emit(ev)
        if not fresh and self.batches.get(bid) is not None and self.batches[bid].started_at == ev.at:
            fresh = True  # our own write, retried after a lost ack
        if fresh:
            self.metrics.batch_commands.labels("accepted").inc()
            return BatchReply(accepted=True, batch_id=bid)
        self.metrics.batch_commands.labels("duplicate").inc()
        log.info("duplicate batch_id, the existing batch stands", extra=kv(batch_id=bid))
        return BatchReply(accepted=True, batch_id=bid, duplicate=True,
                          reason="batch_id already exists; the existing batch stands")

    async def _on_request(self, msg: Msg) -> None:
        if msg.reply:
            self._spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        reply = await self.verdicts.wait(msg.data, REPLY_TIMEOUT_S)
        if reply is None:
            reply = BatchReply(accepted=False, reason=BUSY)
        with contextlib.suppress(Exception):
            await msg.respond(contracts.encode(reply))

    # ----------------------------------------------------------------- conversations

    async def _conversations_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for msg in await fetch(self.conv_sub, 128):
                try:
                    ev = contracts.decode_event(msg.data, ConversationEvent)
                except ContractError as exc:
                    log.warning("bad conversation event ignored", extra=kv(
                        subject=msg.subject, field=exc.field, reason=exc.reason))
                else:
                    async with self.lock:
                        await self._on_conversation_event(ev)
                await msg.ack()

    async def _on_conversation_event(self, ev: ConversationEvent) -> None:
        if isinstance(ev, AgentJoined):
            key = (ev.conversation_id, ev.attempt)

            def joined(state: core.BatchState) -> list[BatchEvent]:
                watch = self.watches.get(key, core.Watch())
                new, events = core.on_agent_joined(state, ev, watch)
                if new != watch:
                    self.watches[key] = new
                return events

            await self._decide(ev.batch_id, joined)
        elif isinstance(ev, ConversationEnded):
            ended = ev
            await self._decide(ev.batch_id, lambda s: core.on_conversation_ended(
                s, ended, time.time(), self.settings))

    # ----------------------------------------------------------------- pacing, deadlines, liveness

    async def _dispatch_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            delay = self.bucket.delay(loop.time())
            if delay > 0:
                await asyncio.sleep(delay)
            self.wake.clear()
            async with self.lock:
                ev = core.plan_dispatch(self._running(), self.settings.max_concurrency, time.time(),
                                        self.settings.max_joining, capacity=self.fleet.view(loop.time()))
                if ev is not None and await self._emit(ev):
                    self.bucket.take(loop.time())
                    continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            now = time.time()
            overdue = [c.room for s in self._running() for c in core.join_overdue(s, now, self.settings)]
            unplaced = await self._unplaced(overdue) if overdue else frozenset()
            async with self.lock:
                for bid in sorted(self.running):
                    await self._decide(bid, functools.partial(self._deadlines, now, unplaced))

    async def _unplaced(self, rooms: list[str]) -> frozenset[str]:
        """The rooms among ``rooms`` with a dispatch livekit-server placed on no worker (no_capacity).
        A room that cannot be checked counts as placed (its attempt becomes a join_timeout)."""
        limit = asyncio.Semaphore(8)

        async def check(room: str) -> bool:
            async with limit:
                try:
                    return await self.rooms.unplaced(room)
                except Exception as exc:
                    log.warning("placement check failed", extra=kv(room=room, error=str(exc)))
                    return False

        found = await asyncio.gather(*(check(r) for r in rooms))
        return frozenset(r for r, bad in zip(rooms, found, strict=True) if bad)

    def _deadlines(self, now: float, unplaced: frozenset[str], state: core.BatchState) -> list[BatchEvent]:
        return core.on_tick(state, now, self.settings, unplaced)

    # ----------------------------------------------------------------- worker capacity

    async def _on_capacity(self, msg: Msg) -> None:
        try:
            hb = contracts.decode(msg.data, WorkerCapacity)
        except ContractError as exc:
            log.warning("bad capacity heartbeat ignored", extra=kv(subject=msg.subject, field=exc.field,
                                                                   reason=exc.reason))
            return
        now = asyncio.get_running_loop().time()
        known = {w.worker_id for w in self.fleet.live(now)}
        if self.fleet.observe(hb, now):
            if hb.worker_id not in known:
                log.info("worker announced", extra=kv(worker_id=hb.worker_id, capacity=hb.capacity, free=hb.free,
                                                      livekit_worker_id=hb.livekit_worker_id))
            self.wake.set()

    def status(self, now: float) -> DispatcherStatus:
        running = self._running()
        view = self.fleet.view(now)
        batches = {s.spec.batch_id: contracts.BatchQueue(in_flight=len(s.in_flight), queued=core.queued(s),
                                                         pending=s.pending) for s in running}
        return DispatcherStatus(workers=view.workers, capacity=view.capacity, free=view.free,
                                reserved=core.reserved(running, view),
                                queued=sum(b.queued for b in batches.values()), batches=batches, at=time.time())

    async def _status_loop(self, stop: asyncio.Event) -> None:
        """Expire silent workers, update the capacity gauges, publish ``dispatcher.status``."""
        loop = asyncio.get_running_loop()
        m = self.metrics
        while not stop.is_set():
            for worker_id in self.fleet.expire(loop.time()):
                log.warning("worker heartbeat expired: its slots leave admission",
                            extra=kv(worker_id=worker_id, expiry_s=self.fleet.expiry_s))
            st = self.status(loop.time())
            m.workers.set(st.workers)
            m.capacity.set(st.capacity)
            m.free.set(st.free)
            m.reserved.set(st.reserved)
            m.queued.set(st.queued)
            with contextlib.suppress(Exception):
                await self.nc.publish(subjects.DISPATCHER_STATUS, contracts.encode(st))
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _liveness_loop(self, stop: asyncio.Event) -> None:
        limit = asyncio.Semaphore(16)

        async def count(room: str) -> int | None:
            async with limit:
                try:
                    return await self.rooms.agent_count(room)
                except Exception as exc:
                    log.warning("liveness check failed", extra=kv(room=room, error=str(exc)))
                    return None

        while not stop.is_set():
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            targets = [(s.spec.batch_id, c.conversation_id, c.attempt, c.room)
                       for s in self._running() for c in (s.convs[i] for i in s.in_flight)
                       if c.joined_at is not None]
            counts = await asyncio.gather(*(count(t[3]) for t in targets))
            async with self.lock:
                for (bid, cid, attempt, _room), agents in zip(targets, counts, strict=True):
                    if agents is not None:
                        await self._decide(bid, functools.partial(self._liveness, cid, attempt, agents))

    def _liveness(self, cid: str, attempt: int, agents: int, state: core.BatchState) -> list[BatchEvent]:
        key = (cid, attempt)
        watch = self.watches.get(key, core.Watch())
        new, events = core.on_liveness(state, cid, attempt, agents, watch, time.time(), self.settings)
        if new != watch:
            self.watches[key] = new
        return events

    # ----------------------------------------------------------------- run

    async def serve(self, stop: asyncio.Event) -> None:
        sub = await self.nc.subscribe(subjects.BATCH_START, cb=self._on_request)
        cap_sub = await self.nc.subscribe(subjects.WORKER_CAPACITY_ALL, cb=self._on_capacity)
        loops = [self._commands_loop, self._conversations_loop, self._dispatch_loop, self._tick_loop,
                 self._liveness_loop, self._status_loop]
        tasks = [asyncio.create_task(self._guard(fn, stop), name=fn.__name__) for fn in loops]
        log.info("dispatcher running", extra=kv(agent_name=self.settings.agent_name,
                                                max_concurrency=self.settings.max_concurrency,
                                                dispatch_rate=self.settings.dispatch_rate))
        try:
            await stop.wait()
        finally:
            await sub.unsubscribe()
            await cap_sub.unsubscribe()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            pending = list(self._room_tasks.values())
            if pending:
                await asyncio.wait(pending, timeout=5)
            for t in list(self._tasks):
                t.cancel()

    async def _guard(self, fn: Callable[[asyncio.Event], Coroutine[Any, Any, None]], stop: asyncio.Event) -> None:
        """Keep a loop alive through unexpected errors (NATS hiccups); log and back off."""
        while not stop.is_set():
            try:
                await fn(stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("loop failed, restarting", extra=kv(loop=fn.__name__))
                await asyncio.sleep(1.0)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    metrics = DispatcherMetrics()
    nc = await bus.connect(settings.nats_url, "dispatcher")
    js = await bus.jetstream(nc)
    rooms = Rooms(settings, metrics)
    try:
        dispatcher = Dispatcher(settings, nc, js, rooms, metrics)
        try:
            await dispatcher.start()
        except UnreadableLog as exc:
            log.error("cannot fold the batch event log", extra=kv(seq=exc.seq, subject=exc.subject, field=exc.field,
                                                                  reason=exc.reason, error=str(exc)))
            raise SystemExit(3) from None
        await dispatcher.serve(stop)
    finally:
        await rooms.aclose()
        # close, not drain: every publish was awaited and every message acked explicitly.
        with contextlib.suppress(Exception):
            await nc.close()
