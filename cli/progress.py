"""The watcher's tally of one batch and the text made from it: pure, no NATS, no terminal.

:class:`BatchProgress` applies a batch's events in stream order (and the dispatcher's live
``dispatcher.status``); ``status_line`` / ``summary_lines`` turn it into text;
``audit_counts`` reads the room audit out of a ``batch.json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.contracts import (
    BatchAccepted,
    BatchCancelled,
    BatchFinished,
    ConversationDispatched,
    ConversationSettled,
    DispatcherStatus,
)


def reason_head(reason: str) -> str:
    """``"join_timeout: no agent after 60s"`` -> ``"join_timeout"`` (for tallies)."""
    return reason.split(":", 1)[0].strip() or "unknown"


@dataclass
class BatchProgress:
    """The watcher's tally of one batch: apply its events in stream order.

    Keyed by (conversation, attempt), so a redelivered event counts once and a
    retried conversation is in flight again until its next attempt settles.
    """

    batch_id: str
    requested: int | None = None
    started_at: float | None = None
    last_at: float | None = None
    finished: BatchFinished | None = None
    cancelled: BatchCancelled | None = None  # batch.cancel accepted: the running ones finish, nothing new starts
    ignored: int = 0
    # From the dispatcher's live ``dispatcher.status`` (not in the batch log): conversations waiting
    # for worker capacity, and the live workers' free/total agent sessions. None until one arrives.
    queued: int | None = None
    free_sessions: int | None = None
    capacity_sessions: int | None = None
    _dispatched: set[tuple[str, int]] = field(default_factory=set)
    _settled: set[tuple[str, int]] = field(default_factory=set)
    _completed: set[str] = field(default_factory=set)
    _failed: dict[str, str] = field(default_factory=dict)

    def apply(self, event: Any) -> None:
        at = getattr(event, "at", None) or getattr(event, "finished_at", None)
        if isinstance(at, int | float):
            self.last_at = max(self.last_at or at, at)
        if isinstance(event, BatchAccepted):
            self.requested = event.spec.conversations
            self.started_at = event.at
        elif isinstance(event, ConversationDispatched):
            self._dispatched.add((event.conversation_id, event.attempt))
        elif isinstance(event, ConversationSettled):
            key = (event.conversation_id, event.attempt)
            self._dispatched.add(key)
            self._settled.add(key)
            if event.outcome == "completed":
                self._completed.add(event.conversation_id)
                self._failed.pop(event.conversation_id, None)
            elif not event.retry and event.conversation_id not in self._completed:
                self._failed[event.conversation_id] = event.reason
        elif isinstance(event, BatchCancelled):
            self.cancelled = self.cancelled or event
        elif isinstance(event, BatchFinished):
            self.finished = event
            self.requested = event.requested
            self.started_at = self.started_at or event.started_at

    def apply_status(self, status: DispatcherStatus) -> None:
        mine = status.batches.get(self.batch_id)
        self.queued = mine.queued if mine is not None else 0
        self.free_sessions, self.capacity_sessions = status.free, status.capacity

    @property
    def waiting(self) -> str:
        """``", 8 queued for worker capacity (0 of 16 sessions free)"`` while conversations wait, else ""
        (``", cancelling: ..."`` once a cancel was accepted)."""
        if self.cancelled is not None and not self.finished:
            return f", cancelling: {self.cancelled.never_started} never started, the running ones finish"
        if self.finished or not self.queued:
            return ""
        return (f", {self.queued} queued for worker capacity "
                f"({self.free_sessions} of {self.capacity_sessions} sessions free)")

    @property
    def completed(self) -> int:
        return self.finished.completed if self.finished else len(self._completed)

    @property
    def failed(self) -> int:
        return self.finished.failed if self.finished else len(self._failed)

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def in_flight(self) -> int:
        return 0 if self.finished else len(self._dispatched - self._settled)

    @property
    def failure_reasons(self) -> Counter[str]:
        return Counter(reason_head(r) for r in self._failed.values())

    def elapsed(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished.finished_at if self.finished else now
        return max(end - self.started_at, 0.0)

    def rate_per_min(self, now: float) -> float:
        """Settled conversations per minute since the batch started."""
        elapsed = self.elapsed(now)
        if not elapsed or elapsed <= 0:
            return 0.0
        return self.done / elapsed * 60.0


def format_duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def status_line(p: BatchProgress, now: float) -> str:
    total = p.requested if p.requested is not None else "?"
    return (
        f"batch {p.batch_id}: {p.done}/{total} settled ({p.completed} completed, {p.failed} failed), "
        f"{p.in_flight} in flight{p.waiting}, {p.rate_per_min(now):.1f} conv/min"
    )


def summary_lines(p: BatchProgress, results: Path, now: float) -> list[str]:
    status = p.finished.status if p.finished else "running"
    total = p.requested if p.requested is not None else "?"
    never = f", {p.finished.cancelled} never started (cancelled)" if p.finished and p.finished.cancelled else ""
    lines = [
        f"batch {p.batch_id} {status}",
        f"  conversations: {p.completed} completed, {p.failed} failed{never}, of {total}",
    ]
    reasons = p.failure_reasons
    if reasons:
        tally = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"  failures: {tally}")
    elapsed = p.elapsed(now)
    if elapsed is not None:
        lines.append(f"  wall time: {format_duration(elapsed)}, {p.rate_per_min(now):.1f} conv/min")
    lines.append(f"  results: {results}/")
    return lines


# The room audit's violations (batch.json, per conversation; services/sink/audit.py), as shown.
AUDIT_LABELS = {
    "two_of_one_role": "rooms audit: two of one role",
    "no_grant": "rooms audit: participant without a grant",
    "third_agent": "rooms audit: third agent",
}


def audit_counts(doc: dict[str, Any]) -> dict[str, int]:
    """Violations by kind over every conversation of a batch.json, and ``unaudited``: conversations
    that were dispatched but that livekit-server's webhooks never reported a participant of."""
    counts = dict.fromkeys(AUDIT_LABELS, 0)
    counts["unaudited"] = 0
    convs = doc.get("conversations")
    for entry in (convs.values() if isinstance(convs, dict) else ()):
        if not isinstance(entry, dict):
            continue
        for v in entry.get("violations") or ():
            if isinstance(v, dict) and v.get("kind") in counts:
                counts[v["kind"]] += 1
        if (entry.get("attempts") or 0) > 0 and not entry.get("participants"):
            counts["unaudited"] += 1
    return counts
