"""The turn pipeline: a fetched batch of turns and ends into transcript files, then acks.

Per fetch: each turn is checked (its subject, its lease: ``fencing.py``), decided by
``core.offer`` against its conversation's :class:`~.core.Transcript`, and the lines it
releases are planned per file; the plan is written (one append per file, files in
parallel: group commit, fsynced) and only then are its messages acked. Out-of-order turns
stay unacked in memory until their gap fills; duplicates and stale attempts are acked
without a write; a conflicting text is kept out and flagged in ``batch.json``. A crash
anywhere loses nothing: unacked messages come back and the files say what is stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from functools import partial

import msgspec
from nats.aio.msg import Msg

from shared import bus, subjects
from shared.contracts import (
    AgentJoined,
    ContractError,
    ConversationEnded,
    ConversationEvent,
    RecordingChannel,
    TurnRecorded,
    id_problem,
)
from shared.log import kv
from shared.metrics import SinkMetrics

from . import core, files
from .core import FileWrite, Transcript
from .docs import Docs
from .fencing import LeaseLog
from .recordings import Recordings
from .wire import drop, kind_of, stored_at, subject_problem

log = logging.getLogger("sink")

Key = tuple[str, str]  # (batch_id, conversation_id)
Plan = dict[Key, FileWrite[Msg]]


class Turns:
    def __init__(self, io: files.Io, docs: Docs, leases: LeaseLog, metrics: SinkMetrics, max_idle: int) -> None:
        self.io = io
        self.docs = docs
        self.leases = leases  # a turn is written only if its lease was the live one (fencing.py)
        self.metrics = metrics
        self.max_idle = max_idle
        self._transcripts: OrderedDict[Key, Transcript[Msg]] = OrderedDict()
        # Held while a fetched batch is decided and committed, so whoever else reads
        # transcript state (the BatchFinished check) sees only what is on disk.
        self._lock = asyncio.Lock()
        self._horizon = 0.0  # newest stored timestamp among the conversation messages in hand
        self.recordings: Recordings | None = None  # voice mode's stereo files (set by the sink)
        self._recordings: list[tuple[RecordingChannel, Msg]] = []

    async def on_events(self, events: list[tuple[ConversationEvent, Msg]]) -> None:
        """Handler of ``<durable>-conv``: turns and conversation ends, one commit per fetch."""
        self._horizon = max(stored_at(m) for _, m in events)
        async with self._lock:
            plan: Plan = {}
            settle_now: list[Msg] = []
            retry: list[Msg] = []
            try:
                for event, msg in events:
                    await self._route(event, msg, plan, settle_now, retry)
            except BaseException:
                # States in the plan describe lines that will not be written now.
                for key, fw in plan.items():
                    await self._forget(key, fw.acks)
                raise
            await bus.ack(settle_now)
            await bus.nak(retry)
            await self._commit(plan)
            await self._record()
            self._evict_idle()
        self.metrics.held.set(sum(len(t.held) for t in self._transcripts.values() if t.held))

    async def _route(
        self, event: ConversationEvent, msg: Msg, plan: Plan, settle_now: list[Msg], retry: list[Msg]
    ) -> None:
        self.metrics.events.labels(kind_of(event)).inc()
        if isinstance(event, AgentJoined):  # not in our filter; nothing to store
            settle_now.append(msg)
            return
        if isinstance(event, RecordingChannel):  # after this fetch's turn lines are on disk
            self._recordings.append((event, msg))
            return
        kind = "turn" if isinstance(event, TurnRecorded) else "ended"
        problem = (
            core.turn_problem(event) if isinstance(event, TurnRecorded) else core.event_problem(event)
        ) or subject_problem(msg.subject, lambda: subjects.conv_event(event.batch_id, event.conversation_id, kind))
        if problem:
            drop(self.metrics, msg, *problem, settle_now)
        elif isinstance(event, ConversationEnded):
            try:
                await self.docs.apply(event, msg)
            except ContractError as exc:  # e.g. a symlink that leads out of the data dir
                drop(self.metrics, msg, exc.field, exc.reason, settle_now)
        else:
            await self._on_turn(event, msg, plan, settle_now, retry)

    async def _record(self) -> None:
        """Voice mode's channel events of this fetch (recordings.py), once its turn lines are durable."""
        pending, self._recordings = self._recordings, []
        for event, msg in pending:
            problem = id_problem(event.batch_id, event.conversation_id) or subject_problem(
                msg.subject, partial(subjects.conv_event, event.batch_id, event.conversation_id, "recording"))
            if problem:
                drop(self.metrics, msg, *problem)
                await bus.ack([msg])
                continue
            if self.recordings is None:
                await bus.ack([msg])
                continue
            try:
                await bus.ack(await self.recordings.on_channel(event, msg))
            except Exception as exc:  # the store unreachable, a write failed: redelivered later
                log.error("recording not written; will retry", extra=kv(
                    batch_id=event.batch_id, conversation_id=event.conversation_id, error=str(exc)))
                await bus.nak([msg], delay=5.0)

    async def _on_turn(
        self, event: TurnRecorded, msg: Msg, plan: Plan, settle_now: list[Msg], retry: list[Msg]
    ) -> None:
        key = (event.batch_id, event.conversation_id)
        try:
            state = await self.transcript(key)
        except ContractError as exc:
            drop(self.metrics, msg, exc.field, exc.reason, settle_now)
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
            try:  # acked once batch.json shows the flag
                await self.docs.flag_conflict(event.batch_id, event.conversation_id, list(step.acks))
            except ContractError:
                settle_now.extend(step.acks)
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
            refusal = await self.leases.check(turn, stored_at(msg), self._horizon)
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

    async def _stored(self, key: Key, turn: int, plan: Plan) -> tuple[str, str] | None:
        """``(role, text)`` stored (or planned in this batch) at index ``turn`` of the conversation."""
        for t in plan[key].lines if key in plan else ():
            if t.turn == turn:
                return t.role, t.text
        line = await self.io.run(files.read_turn, self.io.dirs.transcript(*key), turn)
        return (line.role, line.text) if line is not None else None

    async def transcript(self, key: Key) -> Transcript[Msg]:
        state = self._transcripts.get(key)
        if state is not None:
            self._transcripts.move_to_end(key)
            return state
        found = await self.io.run(files.recover_transcript, self.io.dirs.transcript(*key))
        state = Transcript.recovered(found.attempt, found.lines)
        self._transcripts[key] = state
        return state

    async def missing(self, batch_id: str) -> dict[str, int]:
        """Completed conversations whose file does not yet hold all their turns -> turns it holds."""
        try:
            doc = await self.docs.get(batch_id)
        except ContractError:
            return {}  # dropped by Docs.apply for the same reason
        missing: dict[str, int] = {}
        async with self._lock:
            for conv, attempt, turns in core.transcripts_expected(doc):
                try:
                    state = await self.transcript((batch_id, conv))
                except (OSError, ContractError):
                    missing[conv] = 0
                    continue
                if not state.holds(attempt, turns):
                    missing[conv] = state.file_lines if state.file_attempt == attempt else 0
        return missing

    async def _commit(self, plan: Plan) -> None:
        if not plan:
            return
        started = time.perf_counter()
        results = await asyncio.gather(
            *(self.io.run(self._write, key, fw) for key, fw in plan.items()), return_exceptions=True
        )
        self.metrics.write_seconds.observe(time.perf_counter() - started)
        for (key, fw), result in zip(plan.items(), results, strict=True):
            if isinstance(result, BaseException):
                log.error("transcript write failed; will retry",
                          extra=kv(batch_id=key[0], conversation_id=key[1], error=repr(result)))
                await self._forget(key, fw.acks)
            else:
                self.metrics.turns_written.inc(len(fw.lines))
                await bus.ack(fw.acks)

    async def _forget(self, key: Key, acks: list[Msg]) -> None:
        """Drop what we believed about a file (it is re-read next time) and return its messages."""
        state = self._transcripts.pop(key, None)
        await bus.nak([*acks, *(state.held_acks() if state else ())])

    def _write(self, key: Key, fw: FileWrite[Msg]) -> None:
        path = self.io.dirs.transcript(*key)
        data = fw.payload()
        if fw.replace:
            self.io.dirs.ensure_dir(path.parent)
            files.write_atomic(path, data)
        else:
            files.append(path, data)

    def _evict_idle(self) -> None:
        extra = len(self._transcripts) - self.max_idle
        if extra <= 0:
            return
        for key in list(self._transcripts)[: extra * 2]:
            if extra <= 0:
                break
            if not self._transcripts[key].held:
                del self._transcripts[key]
                extra -= 1
