"""What one job tells the event log about its conversation: joined, each turn, the end, a failure.

Every event goes to ``conv.<batch>.<conversation>.<kind>`` with a message id that makes a
re-publish of the same fact a duplicate JetStream drops (``<conversation>:<attempt>:<kind>...``).
Turns and ends carry the role's lease token, so the sink can refuse words spoken on a lease
that was no longer this job's (services/sink/fencing.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shared import subjects
from shared.contracts import (
    AgentJoined,
    ConversationEnded,
    HeardVia,
    JobMetadata,
    Role,
    TurnRecorded,
)
from shared.metrics import WorkerMetrics
from worker.lifecycle.lease import LeaseKeeper
from worker.lifecycle.turns import End

log = logging.getLogger("worker.job")

Publish = Callable[..., Awaitable[Any]]  # publish(subject, msg, msg_id=...): bus.publish on the job's JetStream


class Reports:
    def __init__(self, publish: Publish, *, meta: JobMetadata, room: str, role: Role, metrics: WorkerMetrics,
                 lease: LeaseKeeper | None = None) -> None:
        self.publish = publish
        self.meta = meta
        self.room = room
        self.role = role
        self.metrics = metrics
        self.lease = lease

    def _subject(self, kind: str) -> str:
        return subjects.conv_event(self.meta.batch_id, self.meta.conversation_id, kind)

    def _msg_id(self, kind: str) -> str:
        return f"{self.meta.conversation_id}:{self.meta.attempt}:{kind}"

    @property
    def _token(self) -> int | None:
        return self.lease.lease if self.lease is not None else None

    async def joined(self, job_id: str, identity: str) -> None:
        m = self.meta
        await self.publish(self._subject("joined"), AgentJoined(
            batch_id=m.batch_id, conversation_id=m.conversation_id, attempt=m.attempt, room=self.room,
            role=self.role, job_id=job_id, identity=identity, at=time.time()),
            msg_id=self._msg_id(f"joined:{self.role}"))

    async def turn(self, turn: int, text: str, *, started_at: float, ended_at: float,
                   first_token_s: float | None, audio_start_s: float | None = None,
                   audio_end_s: float | None = None, heard_text: str | None = None,
                   heard_via: HeardVia | None = None, unprompted: bool = False) -> None:
        m = self.meta
        await self.publish(self._subject("turn"), TurnRecorded(
            batch_id=m.batch_id, conversation_id=m.conversation_id, attempt=m.attempt, turn=turn, role=self.role,
            text=text, started_at=started_at, ended_at=ended_at, first_token_s=first_token_s,
            # a turn said unprompted answers nothing: it has no response time (latency checks skip it)
            total_s=None if unprompted else ended_at - started_at, language=m.language, room=self.room,
            lease=self._token, audio_start_s=audio_start_s, audio_end_s=audio_end_s, heard_text=heard_text,
            heard_via=heard_via, unprompted=unprompted),
            msg_id=self._msg_id(f"turn:{turn}"))
        self.metrics.turns.labels(self.role).inc()
        if first_token_s is not None:
            self.metrics.first_token.labels(self.role).observe(first_token_s)
        if not unprompted:
            self.metrics.turn_seconds.labels(self.role).observe(ended_at - started_at)

    async def ended(self, end: End, turns: int, target_identity: str | None = None) -> None:
        m = self.meta
        await self.publish(self._subject("ended"), ConversationEnded(
            batch_id=m.batch_id, conversation_id=m.conversation_id, attempt=m.attempt, room=self.room,
            reason=end.reason, ok=end.ok, turns=turns, role=self.role, at=time.time(), lease=self._token,
            target_identity=target_identity),
            msg_id=self._msg_id("ended"))

    async def failed(self, exc: BaseException) -> None:
        """The job broke after getting its role: the conversation ends failed, reported by this side."""
        try:
            await self.ended(End(f"agent_error: {self.role}: {type(exc).__name__}", ok=False, mine=True), turns=0)
        except Exception:
            log.exception("could not report the failure")
