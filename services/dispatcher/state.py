"""A batch's state as a pure fold of its events (``batch.evt.<batch_id>``), and the names it uses.

The dispatcher appends an event, then folds it in with :func:`evolve`, so its
in-memory state is always a fold of what is in the stream, and a restarted
dispatcher that replays the stream continues where the last one stopped.
Events that do not fit the state (a stale attempt, a repeat) change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec
from msgspec.structs import replace

from shared import batch_plan, rooms
from shared.contracts import (
    BatchAccepted,
    BatchCancelled,
    BatchEvent,
    BatchFinished,
    BatchSpec,
    ConversationDispatched,
    ConversationJoined,
    ConversationSettled,
    JobMetadata,
)
from shared.metrics import reason_label

# --------------------------------------------------------------------------- naming


def conversation_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:05d}"


# Room names live in shared.rooms (the sink's room audit parses them too).
room_name = rooms.room_name
parse_room = rooms.parse_room


def batch_of(event: BatchEvent) -> str:
    return event.spec.batch_id if isinstance(event, BatchAccepted) else event.batch_id


def job_metadata(spec: BatchSpec, conv_id: str, attempt: int) -> JobMetadata:
    """What an attempt's room and agent dispatches carry to the worker (its scenario: shared/batch_plan.py)."""
    slot = batch_plan.slot(spec, batch_plan.conversation_index(conv_id))
    doc = slot.doc.doc if slot.doc is not None else None
    ext = (doc or {}).get("crosstalk") or {}
    max_turns = ext.get("max_turns") or spec.max_turns
    own = ext.get("language") or "en"
    # spec.language: the batch's override, the scenarios' one language, or "mixed"
    language = spec.language if doc is None or spec.language not in (own, "mixed") else own
    return JobMetadata(
        batch_id=spec.batch_id,
        conversation_id=conv_id,
        attempt=attempt,
        scenario=slot.scenario_id,
        language=language,
        mode=spec.mode,
        max_turns=max_turns,
        scenario_doc=doc,
        trial=slot.trial if spec.scenarios else None,
        target_agent=spec.target_agent,
        target_metadata=spec.target_metadata,
    )


# --------------------------------------------------------------------------- state

ConvStatus = Literal["in_flight", "retry", "completed", "failed"]
BatchStatus = Literal["running", "completed", "failed", "cancelled"]


class Conversation(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation that has been dispatched at least once; ``attempt`` is its latest."""

    conversation_id: str
    attempt: int
    status: ConvStatus
    room: str
    dispatched_at: float
    joined_at: float | None = None
    reason: str = ""
    turns: int = 0
    requeues: int = 0  # earlier attempts that ended no_capacity: they do not count against max_attempts


class BatchState(msgspec.Struct, frozen=True, kw_only=True):
    spec: BatchSpec
    started_at: float
    seq: int  # stream sequence of the last event folded in (for Nats-Expected-Last-Subject-Sequence)
    convs: dict[str, Conversation]  # only conversations dispatched at least once; never mutated
    next_index: int = 0  # the next never-dispatched conversation
    retry_queue: tuple[str, ...] = ()  # conversations waiting for their next attempt, FIFO
    in_flight: frozenset[str] = frozenset()
    completed: int = 0
    failed: int = 0
    status: BatchStatus = "running"
    finished_at: float | None = None
    # batch.cancel accepted (BatchCancelled): nothing more is dispatched; the batch still runs until
    # its conversations in flight settle and its dropped retries are settled for good (core.py).
    cancelled_at: float | None = None

    @property
    def pending(self) -> int:
        if self.cancelled_at is not None:
            return 0
        return self.spec.conversations - self.next_index + len(self.retry_queue)

    @property
    def never_started(self) -> int:
        """Conversations never dispatched: after a cancel, the finished batch's ``cancelled`` count."""
        return self.spec.conversations - self.next_index

    @property
    def settled(self) -> int:
        return self.completed + self.failed

    @property
    def running(self) -> bool:
        return self.status == "running"


# --------------------------------------------------------------------------- the fold


def evolve(state: BatchState | None, event: BatchEvent, seq: int = 0) -> BatchState | None:
    """Fold one event into a batch's state. Events that do not fit (stale attempts, repeats) change nothing but ``seq``."""
    if isinstance(event, BatchAccepted):
        if state is not None:
            return replace(state, seq=max(state.seq, seq))
        return BatchState(spec=event.spec, started_at=event.at, seq=seq, convs={})
    if state is None:
        return None
    state = replace(state, seq=max(state.seq, seq))
    if isinstance(event, ConversationDispatched):
        return _on_dispatched(state, event)
    if isinstance(event, ConversationJoined):
        conv = state.convs.get(event.conversation_id)
        if conv is None or conv.attempt != event.attempt or conv.status != "in_flight" or conv.joined_at:
            return state
        return _put(state, replace(conv, joined_at=event.at))
    if isinstance(event, ConversationSettled):
        return _on_settled(state, event)
    if isinstance(event, BatchCancelled):
        if not state.running or state.cancelled_at is not None:
            return state  # a repeat, or a batch already over: the first word stands
        return replace(state, cancelled_at=event.at)
    if isinstance(event, BatchFinished):
        if not state.running:
            return state
        # A finished batch only needs its summary (duplicate ids, counts): drop per-conversation state.
        return replace(state, status=event.status, finished_at=event.finished_at, convs={},
                       in_flight=frozenset(), retry_queue=())
    return state


def _put(state: BatchState, conv: Conversation, **changes: object) -> BatchState:
    convs = dict(state.convs)
    convs[conv.conversation_id] = conv
    return replace(state, convs=convs, **changes)


def _on_dispatched(state: BatchState, ev: ConversationDispatched) -> BatchState:
    if not state.running or state.cancelled_at is not None:
        return state
    cid = ev.conversation_id
    prev = state.convs.get(cid)
    next_index, retry_queue = state.next_index, state.retry_queue
    if prev is None:
        if cid != conversation_id(state.spec.batch_id, state.next_index):
            return state
        next_index += 1
    elif prev.status == "retry" and ev.attempt == prev.attempt + 1:
        retry_queue = tuple(c for c in retry_queue if c != cid)
    else:
        return state
    conv = Conversation(conversation_id=cid, attempt=ev.attempt, status="in_flight", room=ev.room,
                        dispatched_at=ev.at, requeues=prev.requeues if prev is not None else 0)
    return _put(state, conv, next_index=next_index, retry_queue=retry_queue,
                in_flight=state.in_flight | {cid})


def _on_settled(state: BatchState, ev: ConversationSettled) -> BatchState:
    conv = state.convs.get(ev.conversation_id)
    if conv is None or conv.attempt != ev.attempt:
        return state
    if conv.status == "retry" and state.cancelled_at is not None and not ev.retry:
        # a cancelled batch drops a waiting retry: the attempt that failed is the conversation's last
        dropped = replace(conv, status="failed", reason=ev.reason)
        return _put(state, dropped, retry_queue=tuple(c for c in state.retry_queue if c != conv.conversation_id),
                    failed=state.failed + 1)
    if conv.status != "in_flight":
        return state
    in_flight = state.in_flight - {conv.conversation_id}
    if ev.outcome == "failed" and ev.retry:
        requeues = conv.requeues + (reason_label(ev.reason) == "no_capacity")
        return _put(state, replace(conv, status="retry", reason=ev.reason, requeues=requeues), in_flight=in_flight,
                    retry_queue=(*state.retry_queue, conv.conversation_id))
    settled = replace(conv, status=ev.outcome, reason=ev.reason, turns=ev.turns)
    if ev.outcome == "completed":
        return _put(state, settled, in_flight=in_flight, completed=state.completed + 1)
    return _put(state, settled, in_flight=in_flight, failed=state.failed + 1)


def replay(events: Iterable[tuple[BatchEvent, int]]) -> dict[str, BatchState]:
    """Fold a stream of ``(event, seq)`` for many batches into their states."""
    states: dict[str, BatchState] = {}
    for event, seq in events:
        bid = batch_of(event)
        new = evolve(states.get(bid), event, seq)
        if new is not None:
            states[bid] = new
    return states
