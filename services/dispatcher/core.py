"""The dispatcher's decisions: given a batch's state and one message, the batch events that follow.

Pure: no bytes, no clock, no I/O. Every function takes ``now`` and the state
(:mod:`.state`) and returns the events to append to ``batch.evt.<batch_id>``;
the handlers (:mod:`.handlers`) append them, fold them in and only then run
their effects. Admission (``plan_dispatch``) follows the live workers' capacity.

Volatile observations that are not batch events (which roles of an attempt
have joined, liveness misses) live in :class:`Watch`, one per in-flight
attempt; losing them on a restart only delays a decision, never duplicates one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import msgspec
from msgspec.structs import replace

from shared.capacity import Capacity
from shared.config import Settings
from shared.contracts import (
    ROLES,
    AgentJoined,
    BatchEvent,
    BatchFinished,
    ConversationDispatched,
    ConversationEnded,
    ConversationJoined,
    ConversationSettled,
    StartBatch,
)
from shared.metrics import REASONS, reason_label

from .state import BatchState, Conversation, conversation_id, room_name
from .target import full_not_absent, our_sessions
from .validate import Rejection

# Consecutive liveness checks that must see fewer than two agents before an attempt is failed.
LIVENESS_MISSES = 2
AGENTS_PER_ROOM = 2
MAX_REASON_CHARS = 300
# A dispatch livekit-server could not place on any worker (all full) is re-queued without using
# one of the conversation's max_attempts, at most this many times (a batch never hangs).
MAX_NO_CAPACITY_REQUEUES = 10
NO_CAPACITY = "no_capacity: livekit-server placed no job for this dispatch (every worker full or none registered)"

# --------------------------------------------------------------------------- messages
# Inputs that are not batch events: a decoded command, a timer, an observation, an effect's
# outcome. The handler table takes them like any decoded wire message.


class CommandReceived(msgspec.Struct, frozen=True, kw_only=True):
    """A stored ``batch.start``, decoded (or already refused), with what makes its generated id deterministic."""

    command: StartBatch | Rejection
    seq: int  # BATCH_CMDS stream sequence
    received_at: float


class DispatchDue(msgspec.Struct, frozen=True):
    """The pacing loop holds a token: dispatch the next conversation if admission allows."""


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    """Deadlines are due for a check; ``unplaced``: overdue rooms livekit-server gave to no worker."""

    now: float
    unplaced: frozenset[str] = frozenset()


class RoomCount(msgspec.Struct, frozen=True, kw_only=True):
    """Agents seen in a joined attempt's room by the liveness check."""

    batch_id: str
    conversation_id: str
    attempt: int
    agents: int


class DispatchFailed(msgspec.Struct, frozen=True, kw_only=True):
    """An attempt's room or agent dispatches could not be created (the outcome of an effect)."""

    batch_id: str
    conversation_id: str
    attempt: int
    error: str


class Watch(msgspec.Struct, frozen=True, kw_only=True):
    """What the dispatcher has observed of one in-flight attempt, outside the batch log."""

    roles: frozenset[str] = frozenset()
    misses: int = 0


# --------------------------------------------------------------------------- helpers


def normalize_reason(reason: str) -> str:
    """Make a reason start with one of the bounded labels in ``shared.metrics.REASONS``."""
    reason = (reason.strip() or "other: no reason given")[:MAX_REASON_CHARS]
    head = reason.split(":", 1)[0].strip()
    if head in REASONS:
        return reason
    mapped = {"error": "agent_error", "denied": "role_denied", "peer_left": "agent_left"}.get(head, "other")
    return f"{mapped}: {reason}"


def settle_failed(state: BatchState, conv: Conversation, reason: str, now: float, settings: Settings) -> ConversationSettled:
    reason = normalize_reason(reason)
    if state.cancelled_at is not None:
        retry = False  # batch.cancel: no conversation starts again, this failure is its last word
    elif reason_label(reason) == "no_capacity":
        retry = conv.requeues < MAX_NO_CAPACITY_REQUEUES  # ours, not the conversation's: no attempt used
    elif reason_label(reason).startswith("target_"):
        retry = False  # the user's agent failed: that is the result this batch measures, not a fault to hide
    else:
        retry = conv.attempt - conv.requeues < settings.max_attempts
    return ConversationSettled(
        batch_id=state.spec.batch_id, conversation_id=conv.conversation_id, attempt=conv.attempt,
        outcome="failed", reason=reason, retry=retry, at=now)


def _current(state: BatchState, cid: str, attempt: int) -> Conversation | None:
    conv = state.convs.get(cid)
    if conv is None or conv.attempt != attempt or conv.status != "in_flight" or not state.running:
        return None
    return conv


# --------------------------------------------------------------------------- admission


def joining(state: BatchState) -> int:
    """Conversations dispatched whose two agents have not both joined yet."""
    return sum(1 for cid in state.in_flight if state.convs[cid].joined_at is None)


def reserved(states: Iterable[BatchState], capacity: Capacity) -> int:
    """Agent sessions admitted but not yet running on a live worker.

    Every in-flight conversation holds two sessions (one with a ``target_agent``: the other is the
    user's agent, on its own worker); those the workers' heartbeats already show in its room are
    counted in their ``free`` and are not reserved again. (A conversation whose job ended but that
    is not settled yet is reserved again: conservative for a moment.)
    """
    return sum(our_sessions(s.spec) - min(our_sessions(s.spec), capacity.placed.get(s.convs[cid].room, 0))
               for s in states if s.running for cid in s.in_flight)


def admissible(states: Iterable[BatchState], capacity: Capacity, sessions: int = AGENTS_PER_ROOM) -> int:
    """Conversations of ``sessions`` agent sessions each the live workers can take on top of what is admitted."""
    return max(0, capacity.free - reserved(states, capacity)) // sessions


def queued(state: BatchState) -> int:
    """Conversations the batch's concurrency would run now that are not in flight (waiting for capacity)."""
    if not state.running:
        return 0
    return max(0, min(state.pending, state.spec.concurrency - len(state.in_flight)))


def plan_dispatch(states: Iterable[BatchState], global_cap: int, now: float,
                  max_joining: int | None = None, capacity: Capacity | None = None) -> ConversationDispatched | None:
    """The next conversation to dispatch, or None when no batch may dispatch right now.

    Per batch at most ``spec.concurrency`` in flight, overall at most ``global_cap``, and
    overall at most ``max_joining`` still waiting for their agents: admission follows what the
    workers really absorb, so a batch of 100 ramps in as fast as agents join instead of
    landing 200 job requests on the workers at once. With ``capacity`` (the live workers'
    heartbeats) a conversation is admitted only when two agent sessions are free beyond those
    reserved by conversations admitted and not yet placed: ``concurrency`` is an upper bound;
    no worker heartbeat at all admits nothing (the batch waits, it does not fail).
    The batch with the fewest conversations in flight goes first (oldest on ties),
    so concurrent batches share the global cap; retries go before new conversations.
    """
    running = [s for s in states if s.running]
    if sum(len(s.in_flight) for s in running) >= global_cap:
        return None
    if max_joining is not None and sum(joining(s) for s in running) >= max_joining:
        return None
    eligible = [s for s in running if s.pending > 0 and len(s.in_flight) < s.spec.concurrency]
    if not eligible:
        return None
    state = min(eligible, key=lambda s: (len(s.in_flight), s.started_at, s.spec.batch_id))
    if capacity is not None and admissible(running, capacity, our_sessions(state.spec)) < 1:
        return None
    if state.retry_queue:
        cid = state.retry_queue[0]
        attempt = state.convs[cid].attempt + 1
    else:
        cid = conversation_id(state.spec.batch_id, state.next_index)
        attempt = 1
    return ConversationDispatched(batch_id=state.spec.batch_id, conversation_id=cid, attempt=attempt,
                                  room=room_name(cid, attempt), at=now)


# --------------------------------------------------------------------------- decisions per message


def on_agent_joined(state: BatchState, ev: AgentJoined, watch: Watch) -> tuple[Watch, list[BatchEvent]]:
    """Both roles joined the current attempt -> ConversationJoined."""
    conv = _current(state, ev.conversation_id, ev.attempt)
    if conv is None or conv.joined_at is not None or ev.role not in ROLES:
        return watch, []
    watch = replace(watch, roles=watch.roles | {ev.role})
    if watch.roles != set(ROLES):
        return watch, []
    joined_at = max(ev.at, conv.dispatched_at)
    return watch, [ConversationJoined(batch_id=state.spec.batch_id, conversation_id=conv.conversation_id,
                                      attempt=conv.attempt, join_seconds=joined_at - conv.dispatched_at,
                                      at=joined_at)]


def on_conversation_ended(state: BatchState, ev: ConversationEnded, now: float, settings: Settings) -> list[BatchEvent]:
    conv = _current(state, ev.conversation_id, ev.attempt)
    if conv is None:
        return []
    if ev.ok:
        return [ConversationSettled(
            batch_id=state.spec.batch_id, conversation_id=conv.conversation_id, attempt=conv.attempt,
            outcome="completed", reason=normalize_reason(ev.reason), retry=False, turns=max(ev.turns, 0), at=now)]
    reason = full_not_absent(state, ev) or ev.reason
    return [replace(settle_failed(state, conv, reason, now, settings), turns=max(ev.turns, 0))]


def on_dispatch_failed(state: BatchState, msg: DispatchFailed, now: float, settings: Settings) -> list[BatchEvent]:
    conv = _current(state, msg.conversation_id, msg.attempt)
    if conv is None:
        return []
    return [settle_failed(state, conv, f"dispatch_error: {msg.error}", now, settings)]


def on_liveness(state: BatchState, msg: RoomCount, watch: Watch, now: float,
                settings: Settings) -> tuple[Watch, list[BatchEvent]]:
    """A joined attempt whose room holds fewer than two agents on consecutive checks has lost an agent."""
    conv = _current(state, msg.conversation_id, msg.attempt)
    if conv is None or conv.joined_at is None:
        return watch, []
    if msg.agents >= AGENTS_PER_ROOM:
        return replace(watch, misses=0), []
    watch = replace(watch, misses=watch.misses + 1)
    if watch.misses < LIVENESS_MISSES:
        return watch, []
    reason = f"agent_left: {msg.agents} of {AGENTS_PER_ROOM} agents in the room"
    return watch, [settle_failed(state, conv, reason, now, settings)]


def join_overdue(state: BatchState, now: float, settings: Settings) -> list[Conversation]:
    """In-flight attempts past their join deadline (counted from dispatch: time queued is not counted)."""
    if not state.running:
        return []
    return [c for c in (state.convs[cid] for cid in sorted(state.in_flight))
            if c.joined_at is None and now - c.dispatched_at > settings.join_deadline_s]


def on_tick(state: BatchState, now: float, settings: Settings,
            unplaced: Collection[str] = frozenset()) -> list[BatchEvent]:
    """Deadlines (from each attempt's dispatched ``at``, so they survive restarts) and the batch's end.

    An attempt past its join deadline whose room is in ``unplaced`` (a dispatch livekit-server
    never gave to a worker, per ``list_dispatch``) is ``no_capacity``: re-queued without using
    an attempt. Otherwise it was placed and never joined: ``join_timeout``.
    """
    if not state.running:
        return []
    events: list[BatchEvent] = dropped_retries(state, now)
    for cid in sorted(state.in_flight):
        conv = state.convs[cid]
        age = now - conv.dispatched_at
        if conv.joined_at is None and age > settings.join_deadline_s:
            reason = NO_CAPACITY if conv.room in unplaced else "join_timeout"
            events.append(settle_failed(state, conv, reason, now, settings))
        elif age > settings.conversation_timeout_s:
            events.append(settle_failed(state, conv, "conversation_timeout", now, settings))
    if not events:
        finished = finish(state, now)
        if finished is not None:
            events.append(finished)
    return events


def dropped_retries(state: BatchState, now: float) -> list[BatchEvent]:
    """A cancelled batch's waiting retries, settled for good with their last failure (none otherwise)."""
    if state.cancelled_at is None:
        return []
    return [ConversationSettled(batch_id=state.spec.batch_id, conversation_id=cid, attempt=conv.attempt,
                                outcome="failed", reason=_noted(conv.reason, "not retried, batch cancelled"),
                                retry=False, turns=conv.turns, at=now)
            for cid in state.retry_queue for conv in (state.convs[cid],)]


def _noted(reason: str, note: str) -> str:
    """``reason`` with ``note`` after it, its label (the part before the first colon) kept."""
    return f"{reason} ({note})" if ":" in reason else f"{reason}: {note}"


def finish(state: BatchState, now: float) -> BatchFinished | None:
    """The batch's end: every conversation settled, or, once cancelled, every one that started."""
    if not state.running:
        return None
    if state.cancelled_at is not None:
        if state.in_flight or state.retry_queue:
            return None
        return BatchFinished(
            batch_id=state.spec.batch_id, status="cancelled", requested=state.spec.conversations,
            completed=state.completed, failed=state.failed, cancelled=state.never_started,
            started_at=state.started_at, finished_at=now)
    if state.settled < state.spec.conversations:
        return None
    return BatchFinished(
        batch_id=state.spec.batch_id, status="completed" if state.failed == 0 else "failed",
        requested=state.spec.conversations, completed=state.completed, failed=state.failed,
        started_at=state.started_at, finished_at=now)


class TokenBucket(msgspec.Struct, kw_only=True):
    """Dispatch pacing: ``rate`` tokens a second, capacity one, so dispatch ramps and never bursts."""

    rate: float
    next_at: float = 0.0

    def delay(self, now: float) -> float:
        """Seconds to wait before the next token is available (0 if it is)."""
        return max(0.0, self.next_at - now)

    def take(self, now: float) -> None:
        self.next_at = max(now, self.next_at) + 1.0 / self.rate
