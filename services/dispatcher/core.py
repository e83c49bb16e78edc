"""The dispatcher's pure core: validate commands, fold batch events, decide what happens next.

Nothing here does I/O or reads a clock: every function takes ``now`` and the
state, and returns the events to append (``batch.evt.<batch_id>``) or a
verdict. The entrypoint (:mod:`services.dispatcher.main`) publishes each event
and then folds it in with :func:`evolve`, so the in-memory state is always a
fold of what is in the stream, and a restarted dispatcher that replays the
stream continues where the last one stopped.

Volatile observations that are not batch events (which roles of an attempt
have joined, liveness misses) live in :class:`Watch`, one per in-flight
attempt; losing them on a restart only delays a decision, never duplicates one.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Literal

import msgspec
from msgspec.structs import replace

from shared import contracts, rooms
from shared.capacity import Capacity
from shared.config import Settings
from shared.contracts import (
    ROLES,
    AgentJoined,
    BatchAccepted,
    BatchEvent,
    BatchFinished,
    BatchSpec,
    ContractError,
    ConversationDispatched,
    ConversationEnded,
    ConversationJoined,
    ConversationSettled,
    JobMetadata,
    StartBatch,
)
from shared.metrics import REASONS, reason_label
from shared.scenarios import DEFAULT_SCENARIO, Scenario

# Consecutive liveness checks that must see fewer than two agents before an attempt is failed.
LIVENESS_MISSES = 2
AGENTS_PER_ROOM = 2
MAX_REASON_CHARS = 300
VOICE_UNAVAILABLE = "voice mode is not available in this build"
# A dispatch livekit-server could not place on any worker (all full) is re-queued without using
# one of the conversation's max_attempts, at most this many times (a batch never hangs).
MAX_NO_CAPACITY_REQUEUES = 10
# Public batch.start fields (ARCHITECTURE.md) that this version does not implement yet: refused by name.
PLANNED_FIELDS = frozenset({"target_agent", "target_metadata", "scenarios", "trials"})

# --------------------------------------------------------------------------- validation


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """A command that never becomes a batch: which field, and why."""

    field: str
    reason: str
    batch_id: str | None = None


def generated_batch_id(received_at: float, seed: str) -> str:
    """``b-20261125-165200-3fa2c1``: deterministic per stored command, so a redelivery maps to one batch."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(received_at))
    return f"b-{stamp}-{hashlib.sha256(seed.encode()).hexdigest()[:6]}"


def _claimed_batch_id(body: bytes) -> str | None:
    """The batch_id a bad command names, if it is a valid id (never echo an invalid one)."""
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    value = raw.get("batch_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and contracts.is_id(value) else None


def validate(
    body: bytes,
    settings: Settings,
    scenarios: Mapping[str, Scenario],
    *,
    received_at: float,
    seed: str,
    max_bytes: int,
) -> BatchSpec | Rejection:
    """Turn a ``batch.start`` body into a fully defaulted :class:`BatchSpec`, or say what is wrong."""
    try:
        cmd = contracts.decode(body, StartBatch, max_bytes=max_bytes)
    except ContractError as exc:
        claimed = _claimed_batch_id(body) if len(body) <= max_bytes else None
        reason = unknown_field_reason(exc.field) if "unknown field" in exc.reason else exc.reason
        return Rejection(field=exc.field, reason=reason, batch_id=claimed)
    bid = cmd.batch_id

    def reject(field: str, reason: str) -> Rejection:
        return Rejection(field=field, reason=reason, batch_id=bid)

    if cmd.conversations > settings.max_conversations:
        return reject("conversations", f"must be at most {settings.max_conversations}, got {cmd.conversations}")
    if cmd.concurrency is not None and cmd.concurrency > settings.max_concurrency:
        return reject("concurrency", f"must be at most {settings.max_concurrency}, got {cmd.concurrency}")
    scenario_id = cmd.scenario or DEFAULT_SCENARIO
    scenario = scenarios.get(scenario_id)
    if scenario is None:
        known = ", ".join(sorted(scenarios))
        return reject("scenario", f"unknown scenario {scenario_id!r}; known: {known}")
    if cmd.mode == "voice":
        return reject("mode", VOICE_UNAVAILABLE)
    language = cmd.language or scenario.language
    if language != scenario.language and not settings.real_model:
        return reject("language", language_mismatch(scenario, language, scenarios))
    requested_concurrency = cmd.concurrency or settings.max_concurrency
    return BatchSpec(
        batch_id=bid or generated_batch_id(received_at, seed),
        conversations=cmd.conversations,
        concurrency=min(requested_concurrency, cmd.conversations),
        scenario=scenario_id,
        language=language,
        max_turns=cmd.max_turns,
        mode=cmd.mode,
    )


def unknown_field_reason(name: str) -> str:
    """Why an unknown ``batch.start`` field is refused, with the field the user probably meant."""
    if name in PLANNED_FIELDS:
        return f"{name!r} is not supported by this version of crosstalk; nothing was started"
    known = StartBatch.__struct_fields__
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {name!r}; {hint}known fields: {', '.join(known)}"


def language_mismatch(scenario: Scenario, language: str, scenarios: Mapping[str, Scenario]) -> str:
    """The scripted model plays one script per scenario: never English while Hindi was asked."""
    variants = sorted(s.id for s in scenarios.values() if s.language == language)
    hint = (f"scenarios scripted in {language!r}: {', '.join(variants)}" if variants
            else f"no scenario has an offline script in {language!r}")
    return (f"scenario {scenario.id!r} is scripted in {scenario.language!r}, not {language!r}, and the offline "
            f"model plays the script as written; {hint} (with a real model, OPENAI_API_KEY/OPENAI_BASE_URL, "
            f"any language is served)")


# --------------------------------------------------------------------------- naming


def conversation_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:05d}"


# Room names live in shared.rooms (the sink's room audit parses them too).
room_name = rooms.room_name
parse_room = rooms.parse_room


def job_metadata(spec: BatchSpec, conv_id: str, attempt: int) -> JobMetadata:
    return JobMetadata(
        batch_id=spec.batch_id,
        conversation_id=conv_id,
        attempt=attempt,
        scenario=spec.scenario,
        language=spec.language,
        mode=spec.mode,
        max_turns=spec.max_turns,
    )


def normalize_reason(reason: str) -> str:
    """Make a reason start with one of the bounded labels in ``shared.metrics.REASONS``."""
    reason = (reason.strip() or "other: no reason given")[:MAX_REASON_CHARS]
    head = reason.split(":", 1)[0].strip()
    if head in REASONS:
        return reason
    mapped = {"error": "agent_error", "denied": "role_denied", "peer_left": "agent_left"}.get(head, "other")
    return f"{mapped}: {reason}"


# --------------------------------------------------------------------------- state (a fold)

ConvStatus = Literal["in_flight", "retry", "completed", "failed"]
BatchStatus = Literal["running", "completed", "failed"]


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

    @property
    def pending(self) -> int:
        return self.spec.conversations - self.next_index + len(self.retry_queue)

    @property
    def settled(self) -> int:
        return self.completed + self.failed

    @property
    def running(self) -> bool:
        return self.status == "running"


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
    if not state.running:
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
    if conv is None or conv.attempt != ev.attempt or conv.status != "in_flight":
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
        bid = event.spec.batch_id if isinstance(event, BatchAccepted) else event.batch_id
        new = evolve(states.get(bid), event, seq)
        if new is not None:
            states[bid] = new
    return states


# --------------------------------------------------------------------------- decisions


class Watch(msgspec.Struct, frozen=True, kw_only=True):
    """What the dispatcher has observed of one in-flight attempt, outside the batch log."""

    roles: frozenset[str] = frozenset()
    misses: int = 0


def settle_failed(state: BatchState, conv: Conversation, reason: str, now: float, settings: Settings) -> ConversationSettled:
    reason = normalize_reason(reason)
    if reason_label(reason) == "no_capacity":
        retry = conv.requeues < MAX_NO_CAPACITY_REQUEUES  # ours, not the conversation's: no attempt used
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


def joining(state: BatchState) -> int:
    """Conversations dispatched whose two agents have not both joined yet."""
    return sum(1 for cid in state.in_flight if state.convs[cid].joined_at is None)


def reserved(states: Iterable[BatchState], capacity: Capacity) -> int:
    """Agent sessions admitted but not yet running on a live worker.

    Every in-flight conversation holds two sessions; those the workers' heartbeats already show
    in its room are counted in their ``free`` and are not reserved again. (A conversation whose
    job ended but that is not settled yet is reserved again: conservative for a moment.)
    """
    return sum(AGENTS_PER_ROOM - min(AGENTS_PER_ROOM, capacity.placed.get(s.convs[cid].room, 0))
               for s in states if s.running for cid in s.in_flight)


def admissible(states: Iterable[BatchState], capacity: Capacity) -> int:
    """Conversations the live workers can take on top of what is already admitted."""
    return max(0, capacity.free - reserved(states, capacity)) // AGENTS_PER_ROOM


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
    if capacity is not None and admissible(running, capacity) < 1:
        return None
    if max_joining is not None and sum(joining(s) for s in running) >= max_joining:
        return None
    eligible = [s for s in running if s.pending > 0 and len(s.in_flight) < s.spec.concurrency]
    if not eligible:
        return None
    state = min(eligible, key=lambda s: (len(s.in_flight), s.started_at, s.spec.batch_id))
    if state.retry_queue:
        cid = state.retry_queue[0]
        attempt = state.convs[cid].attempt + 1
    else:
        cid = conversation_id(state.spec.batch_id, state.next_index)
        attempt = 1
    return ConversationDispatched(batch_id=state.spec.batch_id, conversation_id=cid, attempt=attempt,
                                  room=room_name(cid, attempt), at=now)


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
    return [replace(settle_failed(state, conv, ev.reason, now, settings), turns=max(ev.turns, 0))]


def on_dispatch_error(state: BatchState, cid: str, attempt: int, error: str, now: float,
                      settings: Settings) -> list[BatchEvent]:
    conv = _current(state, cid, attempt)
    if conv is None:
        return []
    return [settle_failed(state, conv, f"dispatch_error: {error}", now, settings)]


def on_liveness(state: BatchState, cid: str, attempt: int, agents: int, watch: Watch, now: float,
                settings: Settings) -> tuple[Watch, list[BatchEvent]]:
    """A joined attempt whose room holds fewer than two agents on consecutive checks has lost an agent."""
    conv = _current(state, cid, attempt)
    if conv is None or conv.joined_at is None:
        return watch, []
    if agents >= AGENTS_PER_ROOM:
        return replace(watch, misses=0), []
    watch = replace(watch, misses=watch.misses + 1)
    if watch.misses < LIVENESS_MISSES:
        return watch, []
    reason = f"agent_left: {agents} of {AGENTS_PER_ROOM} agents in the room"
    return watch, [settle_failed(state, conv, reason, now, settings)]


def join_overdue(state: BatchState, now: float, settings: Settings) -> list[Conversation]:
    """In-flight attempts past their join deadline (counted from dispatch: time queued is not counted)."""
    if not state.running:
        return []
    return [c for c in (state.convs[cid] for cid in sorted(state.in_flight))
            if c.joined_at is None and now - c.dispatched_at > settings.join_deadline_s]


NO_CAPACITY = "no_capacity: livekit-server placed no job for this dispatch (every worker full or none registered)"


def on_tick(state: BatchState, now: float, settings: Settings,
            unplaced: Collection[str] = frozenset()) -> list[BatchEvent]:
    """Deadlines (from each attempt's dispatched ``at``, so they survive restarts) and the batch's end.

    An attempt past its join deadline whose room is in ``unplaced`` (a dispatch livekit-server
    never gave to a worker, per ``list_dispatch``) is ``no_capacity``: re-queued without using
    an attempt. Otherwise it was placed and never joined: ``join_timeout``.
    """
    if not state.running:
        return []
    events: list[BatchEvent] = []
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


def finish(state: BatchState, now: float) -> BatchFinished | None:
    if not state.running or state.settled < state.spec.conversations:
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
