"""The sink's NATS wiring: two durable pull consumers into the core and the files.

* ``<durable>-conv`` on CONVERSATIONS, filtered to turns and conversation ends.
  A fetched batch of turns is decided by :func:`core.offer` per conversation, the
  resulting lines are written and fsynced (one append per file, files in parallel:
  group commit), and only then are the messages acked. Out-of-order turns stay
  unacked in memory until their gap fills; duplicates and stale attempts are acked
  without a write. A crash anywhere loses nothing: unacked messages come back and
  the files say what is already stored.
* ``<durable>-batch`` on BATCH_EVENTS (``batch.evt.*``). Batch events and
  conversation ends evolve each batch's ``batch.json``, which is rewritten
  atomically at most every ``flush_interval_s``; their messages are acked after the
  rewrite. A ``BatchFinished`` waits (nak with delay, bounded) until every completed
  conversation's transcript holds its turns.

One sink per durable name: two sinks sharing one would interleave writes to the
same files. Run more sinks with different ``CROSSTALK_SINK_DURABLE`` and data dirs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import streams, subjects
from shared.config import Settings
from shared.contracts import (
    AgentJoined,
    BatchEvent,
    BatchFinished,
    ContractError,
    ConversationEnded,
    ConversationEvent,
    LeaseEvent,
    RoomWebhook,
    TurnRecorded,
    decode,
    decode_event,
)
from shared.log import kv
from shared.metrics import SinkMetrics

from . import core, files
from .core import BatchDoc, BatchDocEvent, FileWrite, Transcript
from .fencing import LeaseLog

log = logging.getLogger("sink")

Key = tuple[str, str]  # (batch_id, conversation_id)


@dataclass(frozen=True)
class SinkConfig:
    data_dir: Path
    durable: str = "sink"
    ack_wait_s: float = 30.0
    deliver: str = "all"  # "all" | "new" (only events published after the first start)
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

    @classmethod
    def from_settings(cls, s: Settings) -> SinkConfig:
        return cls(data_dir=s.data_dir, durable=s.sink_durable, ack_wait_s=s.sink_ack_wait_s, deliver=s.sink_deliver)

    @property
    def conv_consumer(self) -> str:
        return f"{self.durable}-conv"

    @property
    def batch_consumer(self) -> str:
        return f"{self.durable}-batch"

    @property
    def lk_consumer(self) -> str:
        return f"{self.durable}-lk"

    @property
    def roles_consumer(self) -> str:
        return f"{self.durable}-roles"

    def consumer_configs(self) -> list[tuple[str, ConsumerConfig]]:
        policy = DeliverPolicy.NEW if self.deliver == "new" else DeliverPolicy.ALL

        def cfg(name: str, filters: list[str]) -> ConsumerConfig:
            return ConsumerConfig(
                durable_name=name,
                filter_subjects=filters,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=policy,
                ack_wait=self.ack_wait_s,
                max_ack_pending=self.max_ack_pending,
                max_deliver=-1,
            )

        return [
            (
                str(streams.CONVERSATIONS.name),
                cfg(self.conv_consumer, [subjects.conv_kind_filter("turn"), subjects.conv_kind_filter("ended")]),
            ),
            (str(streams.BATCH_EVENTS.name), cfg(self.batch_consumer, [subjects.BATCH_EVENTS_ALL])),
            # the room audit: livekit-server's webhooks and the allocator's grant log
            (str(streams.LIVEKIT_EVENTS.name), cfg(self.lk_consumer, [subjects.LK_ROOM_ALL])),
            (str(streams.ROLES.name), cfg(self.roles_consumer, [subjects.ROLES_ALL])),
        ]


def _kind(event: Any) -> str:
    return str(type(event).__struct_config__.tag)


class Sink:
    def __init__(self, js: JetStreamContext, config: SinkConfig, metrics: SinkMetrics) -> None:
        self.js = js
        self.cfg = config
        self.metrics = metrics
        self.dirs = files.DataDir(config.data_dir)
        self._transcripts: OrderedDict[Key, Transcript[Msg]] = OrderedDict()
        self._docs: dict[str, BatchDoc] = {}
        self._dirty: set[str] = set()
        self._waiting: dict[str, list[Msg]] = defaultdict(list)
        # Held while a fetched batch of turns is decided and committed, so whoever else
        # reads transcript state (the BatchFinished check) sees only what is on disk.
        self._files_lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="sink-io")
        self._conv_sub: JetStreamContext.PullSubscription | None = None
        self._batch_sub: JetStreamContext.PullSubscription | None = None
        self._lk_sub: JetStreamContext.PullSubscription | None = None
        self._roles_sub: JetStreamContext.PullSubscription | None = None
        # Turn fencing: a turn is written only if its lease was the live one (fencing.py).
        self.leases = LeaseLog(js._nc)
        self._horizon = 0.0  # newest stored timestamp among the conversation messages in hand

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for stream, cfg in self.cfg.consumer_configs():
            await streams.ensure_consumer(self.js, stream, cfg)
        self._conv_sub = await self.js.pull_subscribe_bind(
            durable=self.cfg.conv_consumer, stream=streams.CONVERSATIONS.name
        )
        self._batch_sub = await self.js.pull_subscribe_bind(
            durable=self.cfg.batch_consumer, stream=streams.BATCH_EVENTS.name
        )
        self._lk_sub = await self.js.pull_subscribe_bind(
            durable=self.cfg.lk_consumer, stream=streams.LIVEKIT_EVENTS.name
        )
        self._roles_sub = await self.js.pull_subscribe_bind(
            durable=self.cfg.roles_consumer, stream=streams.ROLES.name
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish the batch in hand and flush."""
        assert self._conv_sub is not None and self._batch_sub is not None, "call start() first"
        assert self._lk_sub is not None and self._roles_sub is not None, "call start() first"
        consumers = [
            asyncio.create_task(self._loop(stop, self._conv_sub, self.handle_conversation_msgs)),
            asyncio.create_task(self._loop(stop, self._batch_sub, self.handle_batch_msgs)),
            asyncio.create_task(self._loop(stop, self._lk_sub, self.handle_audit_msgs)),
            asyncio.create_task(self._loop(stop, self._roles_sub, self.handle_audit_msgs)),
        ]
        background = [
            asyncio.create_task(self._every(stop, self.cfg.flush_interval_s, self.flush)),
            asyncio.create_task(self._every(stop, self.cfg.lag_interval_s, self.poll_lag)),
        ]
        try:
            await asyncio.gather(*consumers)
        finally:
            stop.set()
            # The periodic jobs see ``stop`` and end after their current run (a flush
            # cut short would leave acks unsent); wait for them rather than cancel.
            _, slow = await asyncio.wait(background, timeout=30)
            for t in slow:
                t.cancel()
            await self.flush()
            self._pool.shutdown(wait=True)
            # A pull subscription's queue only empties through fetch(): unsubscribe so
            # that draining the connection does not wait out its whole timeout.
            for sub in (self._conv_sub, self._batch_sub, self._lk_sub, self._roles_sub):
                try:
                    await sub.unsubscribe()
                except nats.errors.Error as exc:
                    log.debug("unsubscribe failed", extra=kv(error=repr(exc)))

    async def _loop(self, stop: asyncio.Event, sub: JetStreamContext.PullSubscription, handle: Any) -> None:
        while not stop.is_set():
            msgs = await self._fetch(sub)
            if not msgs:
                continue
            try:
                await handle(msgs)
            except Exception:
                # Unacked messages come back after ack_wait; keep consuming.
                log.exception("batch of messages failed", extra=kv(count=len(msgs)))
                await asyncio.sleep(1.0)

    async def _every(self, stop: asyncio.Event, interval: float, job: Any) -> None:
        while not stop.is_set():
            try:
                await job()
            except Exception:
                log.exception("periodic job failed", extra=kv(job=job.__name__))
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        try:
            # fetch() can stall past its own timeout: bound it from outside too.
            return await asyncio.wait_for(sub.fetch(self.cfg.fetch_batch, timeout=1.0), timeout=6.0)
        except TimeoutError:  # nats' TimeoutError and FetchTimeoutError included
            return []
        except nats.errors.Error as exc:
            log.warning("fetch failed", extra=kv(error=repr(exc)))
            await asyncio.sleep(0.5)
            return []

    # ------------------------------------------------------------------ turns

    async def handle_conversation_msgs(self, msgs: list[Msg]) -> None:
        self._horizon = max(_stored_at(m) for m in msgs) if msgs else 0.0
        async with self._files_lock:
            plan: dict[Key, FileWrite[Msg]] = {}
            settle_now: list[Msg] = []
            retry: list[Msg] = []
            try:
                for msg in msgs:
                    await self._route_conversation(msg, plan, settle_now, retry)
            except BaseException:
                # States in the plan describe lines that will not be written now.
                for key, fw in plan.items():
                    await self._forget(key, fw.acks)
                raise
            await self._ack(settle_now)
            await self._nak(retry)
            await self._commit(plan)
            self._evict_idle()
        self.metrics.held.set(sum(len(t.held) for t in self._transcripts.values() if t.held))

    async def _route_conversation(
        self, msg: Msg, plan: dict[Key, FileWrite[Msg]], settle_now: list[Msg], retry: list[Msg]
    ) -> None:
        try:
            event = decode_event(msg.data, ConversationEvent)
        except ContractError as exc:
            self._drop(msg, exc.field, exc.reason, settle_now)
            return
        self.metrics.events.labels(_kind(event)).inc()
        if isinstance(event, AgentJoined):  # not in our filter; nothing to store
            settle_now.append(msg)
            return
        kind = "turn" if isinstance(event, TurnRecorded) else "ended"
        problem = (
            core.turn_problem(event) if isinstance(event, TurnRecorded) else core.event_problem(event)
        ) or _subject_problem(msg.subject, lambda: subjects.conv_event(event.batch_id, event.conversation_id, kind))
        if problem:
            self._drop(msg, *problem, settle_now)
            return
        if isinstance(event, ConversationEnded):
            try:
                await self._apply_doc(event, msg)
            except ContractError as exc:  # e.g. a symlink that leads out of the data dir
                self._drop(msg, exc.field, exc.reason, settle_now)
            return
        key = (event.batch_id, event.conversation_id)
        try:
            state = await self._transcript(key)
        except ContractError as exc:
            self._drop(msg, exc.field, exc.reason, settle_now)
            return
        except OSError as exc:
            log.error("transcript unreadable", extra=kv(batch_id=key[0], conversation_id=key[1], error=str(exc)))
            retry.append(msg)
            return
        if not await self._leased(event, msg, settle_now, retry):
            return
        try:
            stored = await self._stored(key, event.turn, plan) if core.repeats_stored(state, event) else None
        except (OSError, msgspec.DecodeError) as exc:
            log.error("transcript unreadable", extra=kv(batch_id=key[0], conversation_id=key[1], error=str(exc)))
            retry.append(msg)
            return
        step = core.offer(state, event, msg, stored)
        self._transcripts[key] = step.state
        if step.outcome == "conflict":
            # Never acked silently as a duplicate: kept out, counted, flagged in batch.json.
            self.metrics.conflicts.inc()
            log.warning("conflicting text for a stored turn kept out", extra=kv(
                batch_id=key[0], conversation_id=key[1], attempt=event.attempt, turn=event.turn, role=event.role,
                stored_role=stored[0] if stored else None, lease=event.lease))
            await self._flag_conflict(event, list(step.acks), settle_now)
            return
        if step.outcome == "duplicate":
            self.metrics.duplicates.inc()
        elif step.outcome == "stale":
            self.metrics.dropped.labels("stale_attempt").inc()
        if step.lines:
            plan.setdefault(key, FileWrite()).add(step)
        elif key in plan:
            # A redelivery of a line planned in this batch must not be acked before
            # that line is durable: it may be the very same stream message.
            plan[key].acks.extend(step.acks)
        else:
            settle_now.extend(step.acks)

    async def _leased(self, turn: TurnRecorded, msg: Msg, settle_now: list[Msg], retry: list[Msg]) -> bool:
        """Was the turn's lease the live lease of its role in its room when it was stored?
        A refused turn is acked, counted and logged, never written."""
        try:
            refusal = await self.leases.check(turn, _stored_at(msg), self._horizon)
        except Exception as exc:  # the lease log unreachable for now: judge it later
            log.warning("lease check failed; will retry", extra=kv(
                batch_id=turn.batch_id, conversation_id=turn.conversation_id, turn=turn.turn, error=repr(exc)))
            retry.append(msg)
            return False
        if refusal is None:
            return True
        self.metrics.turns_refused.labels(refusal).inc()
        log.warning("turn refused: its lease was not live", extra=kv(
            batch_id=turn.batch_id, conversation_id=turn.conversation_id, attempt=turn.attempt, turn=turn.turn,
            role=turn.role, room=turn.room, lease=turn.lease, reason=refusal))
        settle_now.append(msg)
        return False

    async def _stored(self, key: Key, turn: int, plan: dict[Key, FileWrite[Msg]]) -> tuple[str, str] | None:
        """``(role, text)`` stored (or planned in this batch) at index ``turn`` of the conversation."""
        for t in plan[key].lines if key in plan else ():
            if t.turn == turn:
                return t.role, t.text
        path = self.dirs.transcript(*key)
        line = await asyncio.get_running_loop().run_in_executor(self._pool, files.read_turn, path, turn)
        return (line.role, line.text) if line is not None else None

    async def _flag_conflict(self, turn: TurnRecorded, acks: list[Msg], settle_now: list[Msg]) -> None:
        try:
            doc = await self._doc(turn.batch_id)
        except ContractError:
            settle_now.extend(acks)
            return
        self._docs[turn.batch_id] = core.flag_conflict(doc, turn.conversation_id)
        self._dirty.add(turn.batch_id)
        self._waiting[turn.batch_id].extend(acks)  # acked once batch.json shows the flag

    async def _transcript(self, key: Key) -> Transcript[Msg]:
        state = self._transcripts.get(key)
        if state is not None:
            self._transcripts.move_to_end(key)
            return state
        path = self.dirs.transcript(*key)
        found = await asyncio.get_running_loop().run_in_executor(self._pool, files.recover_transcript, path)
        state = Transcript.recovered(found.attempt, found.lines)
        self._transcripts[key] = state
        return state

    async def _commit(self, plan: dict[Key, FileWrite[Msg]]) -> None:
        if not plan:
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._write, key, fw) for key, fw in plan.items()),
            return_exceptions=True,
        )
        self.metrics.write_seconds.observe(time.perf_counter() - started)
        for (key, fw), result in zip(plan.items(), results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "transcript write failed; will retry",
                    extra=kv(batch_id=key[0], conversation_id=key[1], error=repr(result)),
                )
                await self._forget(key, fw.acks)
            else:
                self.metrics.turns_written.inc(len(fw.lines))
                await self._ack(fw.acks)

    async def _forget(self, key: Key, acks: list[Msg]) -> None:
        """Drop what we believed about a file (it is re-read next time) and return its messages."""
        state = self._transcripts.pop(key, None)
        await self._nak([*acks, *(state.held_acks() if state else ())])

    def _write(self, key: Key, fw: FileWrite[Msg]) -> None:
        path = self.dirs.transcript(*key)
        data = fw.payload()
        if fw.replace:
            self.dirs.ensure_dir(path.parent)
            files.write_atomic(path, data)
        else:
            files.append(path, data)

    def _evict_idle(self) -> None:
        extra = len(self._transcripts) - self.cfg.max_idle_transcripts
        if extra <= 0:
            return
        for key in list(self._transcripts)[: extra * 2]:
            if extra <= 0:
                break
            if not self._transcripts[key].held:
                del self._transcripts[key]
                extra -= 1

    # ------------------------------------------------------------------ batch.json

    async def handle_batch_msgs(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                event = decode_event(msg.data, BatchEvent)
            except ContractError as exc:
                self._drop(msg, exc.field, exc.reason)
                await self._ack([msg])
                continue
            self.metrics.events.labels(_kind(event)).inc()
            batch_id = core.batch_of(event)
            problem = core.event_problem(event) or _subject_problem(
                msg.subject, lambda b=batch_id: subjects.batch_events(b)
            )
            if problem:
                self._drop(msg, *problem)
                await self._ack([msg])
                continue
            short: dict[str, int] = {}
            if isinstance(event, BatchFinished):
                short = await self.missing_transcripts(batch_id)
                if short:
                    deliveries = msg.metadata.num_delivered
                    if deliveries < self.cfg.finish_max_deliveries:
                        await self._nak([msg], delay=self.cfg.finish_retry_s)
                        continue
                    # Never "completed" with transcripts short: those conversations are failed, by name.
                    log.error(
                        "batch finished with transcripts still short: failing those conversations",
                        extra=kv(batch_id=batch_id, conversations=sorted(short)[:20], count=len(short)),
                    )
                    self.metrics.incomplete.inc(len(short))
            try:
                await self._apply_doc(event, msg)
                if short:
                    self._docs[batch_id] = core.mark_incomplete(self._docs[batch_id], short)
                    self._dirty.add(batch_id)
            except ContractError as exc:
                self._drop(msg, exc.field, exc.reason)
                await self._ack([msg])

    async def missing_transcripts(self, batch_id: str) -> dict[str, int]:
        """Completed conversations whose file does not yet hold all their turns -> turns it holds."""
        try:
            doc = await self._doc(batch_id)
        except ContractError:
            return {}  # dropped by _apply_doc for the same reason
        missing: dict[str, int] = {}
        async with self._files_lock:
            for conv, attempt, turns in core.transcripts_expected(doc):
                try:
                    state = await self._transcript((batch_id, conv))
                except (OSError, ContractError):
                    missing[conv] = 0
                    continue
                if not state.holds(attempt, turns):
                    missing[conv] = state.file_lines if state.file_attempt == attempt else 0
        return missing

    # ------------------------------------------------------------------ room audit

    async def handle_audit_msgs(self, msgs: list[Msg]) -> None:
        """Webhooks (``lk.room.*``) and lease events (``roles.*``) into each conversation's
        room audit in ``batch.json`` (audit.py); acked once the document is on disk."""
        for msg in msgs:
            try:
                fact: RoomWebhook | LeaseEvent = decode(
                    msg.data, RoomWebhook if msg.subject.startswith(subjects.LK_ROOM_PREFIX + ".") else LeaseEvent
                )
            except ContractError as exc:
                self._drop(msg, exc.field, exc.reason)
                await self._ack([msg])
                continue
            self.metrics.events.labels(fact.event if isinstance(fact, RoomWebhook) else "lease").inc()
            target = core.audit_target(fact.room)
            if target is None:  # not a conversation room: nothing to audit
                await self._ack([msg])
                continue
            batch_id = target[0]
            try:
                doc = await self._doc(batch_id)
            except ContractError as exc:
                self._drop(msg, exc.field, exc.reason)
                await self._ack([msg])
                continue
            seq = msg.metadata.sequence.stream if isinstance(fact, LeaseEvent) else None
            new = core.audit_fact(doc, fact, seq)
            if new is not doc:
                self._docs[batch_id] = new
                self._dirty.add(batch_id)
            self._waiting[batch_id].append(msg)

    async def _doc(self, batch_id: str) -> BatchDoc:
        doc = self._docs.get(batch_id)
        if doc is None:
            path = self.dirs.batch_json(batch_id)
            found = await asyncio.get_running_loop().run_in_executor(self._pool, files.read_doc, path)
            # Another consumer loop may have loaded (and evolved) it meanwhile: keep that one.
            doc = self._docs.setdefault(batch_id, found if found is not None else BatchDoc(batch_id=batch_id))
        return doc

    async def _apply_doc(self, event: BatchDocEvent, msg: Msg) -> None:
        batch_id = core.batch_of(event)
        doc = await self._doc(batch_id)
        new = core.evolve(doc, event)
        if new is not doc:
            self._docs[batch_id] = new
            self._dirty.add(batch_id)
        self._waiting[batch_id].append(msg)  # acked once the doc that reflects it is on disk

    async def flush(self) -> None:
        """Write every changed batch.json atomically, then ack the events it reflects."""
        loop = asyncio.get_running_loop()
        for batch_id in list(self._dirty | self._waiting.keys()):
            acks = self._waiting.pop(batch_id, [])
            if batch_id in self._dirty:
                doc = self._docs[batch_id]
                self._dirty.discard(batch_id)
                try:
                    await loop.run_in_executor(self._pool, self._write_doc, batch_id, doc)
                except OSError as exc:
                    log.error("batch.json write failed; will retry", extra=kv(batch_id=batch_id, error=str(exc)))
                    self._dirty.add(batch_id)
                    self._waiting[batch_id][:0] = acks
                    continue
            await self._ack(acks)
            current = self._docs.get(batch_id)
            if current is not None and current.status != "running" and batch_id not in self._dirty:
                if not self._waiting.get(batch_id):
                    self._docs.pop(batch_id, None)  # finished: re-read from disk if ever needed

    def _write_doc(self, batch_id: str, doc: BatchDoc) -> None:
        path = self.dirs.batch_json(batch_id)
        self.dirs.ensure_dir(path.parent)
        files.write_atomic(path, core.encode_doc(doc))

    # ------------------------------------------------------------------ plumbing

    async def poll_lag(self) -> None:
        lag = 0
        for sub in (self._conv_sub, self._batch_sub, self._lk_sub, self._roles_sub):
            if sub is None:
                continue
            try:
                info = await sub.consumer_info()
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("consumer info failed", extra=kv(error=repr(exc)))
                return
            lag += (info.num_pending or 0) + (info.num_ack_pending or 0)
        self.metrics.lag.set(lag)

    def _drop(self, msg: Msg, field: str, reason: str, settle: list[Msg] | None = None) -> None:
        log.warning("event dropped", extra=kv(subject=msg.subject, field=field, reason=reason))
        self.metrics.dropped.labels("invalid").inc()
        if settle is not None:
            settle.append(msg)

    async def _ack(self, msgs: list[Msg]) -> None:
        for m in msgs:
            try:
                await m.ack()
            except MsgAlreadyAckdError:
                pass
            except nats.errors.Error as exc:  # redelivered later; duplicates are harmless
                log.debug("ack failed", extra=kv(error=repr(exc)))

    async def _nak(self, msgs: list[Msg], delay: float = 1.0) -> None:
        for m in msgs:
            try:
                await m.nak(delay=delay)
            except MsgAlreadyAckdError:
                pass
            except nats.errors.Error as exc:
                log.debug("nak failed", extra=kv(error=repr(exc)))


def _stored_at(msg: Msg) -> float:
    """The message's JetStream timestamp (server time)."""
    return msg.metadata.timestamp.timestamp()


def _subject_problem(subject: str, expected: Any) -> tuple[str, str] | None:
    try:
        want = expected()
    except ContractError as exc:
        return exc.field, exc.reason
    if subject != want:
        return "subject", f"{subject!r} does not match the event's ids (expected {want!r})"
    return None
