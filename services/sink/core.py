"""The transcript sink's decisions, with no I/O.

Two pieces of state, both folds of events:

* :class:`Transcript`: what one conversation file holds (its attempt and how many
  turns) plus out-of-order turns held until their gap fills. :func:`offer` decides
  what a turn event does: append a run of lines, start a new attempt (replace the
  file), count a duplicate, drop a stale attempt, or hold it. Every ack handle that
  comes in goes out again in exactly one step, to be settled once the step's lines
  are durable; the caller never acks anything the core did not release.
* :class:`BatchDoc`: the content of ``batch.json``, evolved by batch events and
  conversation ends (:func:`evolve`). Applying an event twice changes nothing, so a
  document recovered from disk can take redeliveries of events it already reflects.

The file formats (one :class:`TurnLine` a line, one :class:`BatchDoc` per batch) are
public contracts (ARCHITECTURE.md, data directory): add fields, never rename.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Generic, Literal, TypeVar

import msgspec

from shared.contracts import (
    BatchAccepted,
    BatchFinished,
    ConversationDispatched,
    ConversationEnded,
    ConversationJoined,
    ConversationSettled,
    LeaseEvent,
    RoomWebhook,
    TurnRecorded,
    is_id,
    is_token,
)
from shared.rooms import parse_room_full

from . import audit

A = TypeVar("A")  # an ack handle; a JetStream message in production, anything in tests

# Far above any max_turns (StartBatch caps it at 200); a turn beyond is a bad event,
# not something to hold in memory waiting for a gap that will never fill.
MAX_TURN = 10_000

# --------------------------------------------------------------------------- turn lines


class TurnLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``conversations/<conversation_id>.jsonl`` (field order is the file's)."""

    conversation_id: str
    turn: int
    role: str
    text: str
    started_at: float
    ended_at: float
    attempt: int
    batch_id: str
    first_token_s: float | None = None
    total_s: float | None = None
    language: str | None = None


_line_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(TurnLine)


def encode_line(turn: TurnRecorded) -> bytes:
    """The turn as one JSON line: UTF-8 as is (Devanagari stays the same bytes), ``\\n`` ended."""
    line = TurnLine(
        conversation_id=turn.conversation_id,
        turn=turn.turn,
        role=turn.role,
        text=turn.text,
        started_at=turn.started_at,
        ended_at=turn.ended_at,
        attempt=turn.attempt,
        batch_id=turn.batch_id,
        first_token_s=turn.first_token_s,
        total_s=turn.total_s,
        language=turn.language,
    )
    return _line_encoder.encode(line) + b"\n"


def decode_line(data: bytes) -> TurnLine:
    return _line_decoder.decode(data)


def turn_problem(turn: TurnRecorded) -> tuple[str, str] | None:
    """``(field, reason)`` if the turn must not be stored, else ``None``.

    The ids become a directory and a file name, so they are checked here before any
    path is built (and the path is checked again under the data dir by the store).
    """
    if not is_id(turn.batch_id):
        return "batch_id", "must match [a-z0-9][a-z0-9-]{0,63}"
    if not is_token(turn.conversation_id):
        return "conversation_id", "must be 1-128 of [A-Za-z0-9_-]"
    if turn.attempt < 1:
        return "attempt", f"must be >= 1, got {turn.attempt}"
    if not 0 <= turn.turn <= MAX_TURN:
        return "turn", f"must be between 0 and {MAX_TURN}, got {turn.turn}"
    return None


# --------------------------------------------------------------------------- transcripts


@dataclass(frozen=True)
class Transcript(Generic[A]):
    """One conversation file and the turns waiting to join it.

    ``file_attempt``/``file_lines`` describe the file (turns ``0..file_lines-1`` of
    that attempt); ``attempt``/``next_turn`` the attempt being recorded, which is
    ahead of the file only between a newer attempt's first event and its turn 0.
    """

    attempt: int = 0
    next_turn: int = 0
    file_attempt: int = 0
    file_lines: int = 0
    # turn -> (the turn, every delivery of it); copied on change, never mutated
    held: Mapping[int, tuple[TurnRecorded, tuple[A, ...]]] = field(default_factory=dict)

    @classmethod
    def recovered(cls, attempt: int, lines: int) -> Transcript[A]:
        """State of a file found on disk holding ``lines`` turns of ``attempt``."""
        return cls(attempt=attempt, next_turn=lines, file_attempt=attempt, file_lines=lines)

    def held_acks(self) -> Iterator[A]:
        for _, acks in self.held.values():
            yield from acks

    def holds(self, attempt: int, turns: int) -> bool:
        """Does the file hold at least ``turns`` turns of ``attempt``?"""
        return self.file_attempt == attempt and self.file_lines >= turns


Outcome = Literal["written", "duplicate", "stale", "held", "conflict"]


@dataclass(frozen=True)
class Step(Generic[A]):
    """What one turn event does.

    ``lines`` go to the file after whatever is already planned for it, or, when
    ``replace`` is set, become the whole file (a new attempt starts). ``acks`` are
    settled once that write is durable (or at once when there is nothing to write).
    """

    state: Transcript[A]
    outcome: Outcome
    lines: tuple[TurnRecorded, ...] = ()
    replace: bool = False
    acks: tuple[A, ...] = ()


def repeats_stored(state: Transcript[A], turn: TurnRecorded) -> bool:
    """Is ``turn``'s index already stored (or planned) for its attempt? Then :func:`offer` wants
    the stored line's ``(role, text)`` to tell a redelivery from a conflicting text."""
    return turn.attempt == state.attempt and turn.turn < state.next_turn


def offer(state: Transcript[A], turn: TurnRecorded, ack: A, stored: tuple[str, str] | None = None) -> Step[A]:
    """Decide what ``turn`` (validated by :func:`turn_problem`) does to ``state``.

    ``stored``: the ``(role, text)`` already stored at ``turn.turn`` (see :func:`repeats_stored`).
    A repeat whose role or text differs from what is stored (or held) is a ``conflict``: kept
    out, its ack released for the caller to settle once the conversation is flagged."""
    if turn.attempt < state.attempt:
        return Step(state, "stale", acks=(ack,))
    released: tuple[A, ...] = ()
    if turn.attempt > state.attempt:
        # A retry started over: the older attempt's held turns will never be written.
        released = tuple(state.held_acks())
        state = Transcript(
            attempt=turn.attempt, next_turn=0, file_attempt=state.file_attempt, file_lines=state.file_lines
        )
    if turn.turn < state.next_turn:
        if stored is not None and stored != (turn.role, turn.text):
            return Step(state, "conflict", acks=(*released, ack))
        return Step(state, "duplicate", acks=(*released, ack))
    if turn.turn > state.next_turn:
        held = dict(state.held)
        first, acks = held.get(turn.turn, (turn, ()))
        if acks and (first.role, first.text) != (turn.role, turn.text):
            return Step(state, "conflict", acks=(*released, ack))
        held[turn.turn] = (first, (*acks, ack))
        outcome: Outcome = "duplicate" if acks else "held"
        return Step(_replace(state, held=held), outcome, acks=released)
    # turn == next_turn: write it and every held turn it makes contiguous.
    held = dict(state.held)
    run = [turn]
    acks_out = [*released, ack]
    n = turn.turn + 1
    while n in held:
        t, a = held.pop(n)
        run.append(t)
        acks_out.extend(a)
        n += 1
    replace = state.file_attempt != state.attempt
    new = Transcript(
        attempt=state.attempt,
        next_turn=n,
        file_attempt=state.attempt,
        file_lines=n,
        held=held,
    )
    return Step(new, "written", tuple(run), replace, tuple(acks_out))


@dataclass
class FileWrite(Generic[A]):
    """What one commit does to one file: append ``lines``, or replace it with them."""

    replace: bool = False
    lines: list[TurnRecorded] = field(default_factory=list)
    acks: list[A] = field(default_factory=list)

    def add(self, step: Step[A]) -> None:
        if step.replace:
            # Lines planned earlier in this commit belong to an older attempt.
            self.replace = True
            self.lines = list(step.lines)
        else:
            self.lines.extend(step.lines)
        self.acks.extend(step.acks)

    def payload(self) -> bytes:
        return b"".join(encode_line(t) for t in self.lines)


# --------------------------------------------------------------------------- batch.json

Status = Literal["running", "completed", "failed"]


class ConversationEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation in ``batch.json``: ``outcome`` once settled for good."""

    outcome: Literal["completed", "failed"] | None = None
    reason: str | None = None
    attempts: int = 0
    turns: int = 0
    ended: str | None = None  # how its latest attempt ended (ConversationEnded.reason)
    conflicts: int = 0  # turn events kept out: an index already stored, with a different text
    # Room audit (livekit-server's webhooks joined with the allocator's grants; see audit.py).
    participants: list[audit.Participant] = []
    grants: list[audit.Grant] = []
    rooms: list[audit.RoomSeen] = []
    violations: list[audit.Violation] = []


class BatchDoc(msgspec.Struct, frozen=True, kw_only=True):
    """``batches/<batch_id>/batch.json``. ``requested`` is the spec's ``conversations``."""

    batch_id: str
    status: Status = "running"
    requested: int = 0
    completed: int = 0
    failed: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    concurrency: int | None = None
    scenario: str | None = None
    language: str | None = None
    max_turns: int | None = None
    mode: str | None = None
    conversations: dict[str, ConversationEntry] = {}


BatchDocEvent = (
    BatchAccepted
    | ConversationDispatched
    | ConversationJoined
    | ConversationSettled
    | BatchFinished
    | ConversationEnded
)

_doc_encoder = msgspec.json.Encoder()
_doc_decoder = msgspec.json.Decoder(BatchDoc)


def encode_doc(doc: BatchDoc) -> bytes:
    return msgspec.json.format(_doc_encoder.encode(doc), indent=2) + b"\n"


def decode_doc(data: bytes) -> BatchDoc:
    return _doc_decoder.decode(data)


def event_problem(event: BatchDocEvent) -> tuple[str, str] | None:
    """``(field, reason)`` if a batch/conversation event must not touch ``batch.json``."""
    if not is_id(event.batch_id if not isinstance(event, BatchAccepted) else event.spec.batch_id):
        return "batch_id", "must match [a-z0-9][a-z0-9-]{0,63}"
    conv = getattr(event, "conversation_id", None)
    if conv is not None and not is_token(conv):
        return "conversation_id", "must be 1-128 of [A-Za-z0-9_-]"
    return None


def batch_of(event: BatchDocEvent) -> str:
    return event.spec.batch_id if isinstance(event, BatchAccepted) else event.batch_id


def evolve(doc: BatchDoc, event: BatchDocEvent) -> BatchDoc:
    """The document after ``event``; the same object when the event changes nothing."""
    if isinstance(event, BatchAccepted):
        s = event.spec
        new = msgspec.structs.replace(
            doc,
            requested=s.conversations if doc.status == "running" else doc.requested,
            started_at=doc.started_at if doc.started_at is not None else event.at,
            concurrency=s.concurrency,
            scenario=s.scenario,
            language=s.language,
            max_turns=s.max_turns,
            mode=s.mode,
        )
        return doc if new == doc else new
    if isinstance(event, BatchFinished):
        new = msgspec.structs.replace(
            doc,
            status=event.status,
            requested=event.requested,
            completed=event.completed,
            failed=event.failed,
            started_at=event.started_at,
            finished_at=event.finished_at,
        )
        return doc if new == doc else new
    if isinstance(event, ConversationJoined):
        return doc
    old = doc.conversations.get(event.conversation_id, ConversationEntry())
    entry = _entry(old, event)
    if entry == old and event.conversation_id in doc.conversations:
        return doc
    conversations = dict(doc.conversations)
    conversations[event.conversation_id] = entry
    completed, failed = doc.completed, doc.failed
    if doc.status == "running":  # once finished, BatchFinished's counts are the word
        completed += (entry.outcome == "completed") - (old.outcome == "completed")
        failed += (entry.outcome == "failed") - (old.outcome == "failed")
    return msgspec.structs.replace(doc, conversations=conversations, completed=completed, failed=failed)


def _entry(
    old: ConversationEntry, event: ConversationDispatched | ConversationSettled | ConversationEnded
) -> ConversationEntry:
    attempts = max(old.attempts, event.attempt)
    if isinstance(event, ConversationDispatched):
        return msgspec.structs.replace(old, attempts=attempts)
    if isinstance(event, ConversationEnded):
        ended = event.reason if event.attempt >= old.attempts else old.ended
        return msgspec.structs.replace(old, attempts=attempts, ended=ended)
    if event.retry:  # not the final word: another attempt follows
        return msgspec.structs.replace(old, attempts=attempts)
    if old.outcome is not None and event.attempt < old.attempts:
        return msgspec.structs.replace(old, attempts=attempts)
    return msgspec.structs.replace(
        old, outcome=event.outcome, reason=event.reason, attempts=attempts, turns=event.turns
    )


TRANSCRIPT_INCOMPLETE = "transcript_incomplete"


def mark_incomplete(doc: BatchDoc, short: Mapping[str, int]) -> BatchDoc:
    """Fail the completed conversations whose transcript stayed short (``short``: conversation -> turns stored).

    A batch whose transcripts are short is never called completed: each such conversation becomes
    ``failed`` with ``transcript_incomplete: <stored> of <turns> turns stored`` and the batch ``failed``.
    Applying it again changes nothing.
    """
    conversations = dict(doc.conversations)
    moved = 0
    for conv, stored in short.items():
        entry = conversations.get(conv)
        if entry is None or entry.outcome != "completed":
            continue
        reason = f"{TRANSCRIPT_INCOMPLETE}: {stored} of {entry.turns} turns stored"
        conversations[conv] = msgspec.structs.replace(entry, outcome="failed", reason=reason)
        moved += 1
    if not moved:
        return doc
    return msgspec.structs.replace(doc, conversations=conversations, completed=doc.completed - moved,
                                   failed=doc.failed + moved, status="failed")


def flag_conflict(doc: BatchDoc, conversation_id: str) -> BatchDoc:
    """``batch.json`` after one more conflicting turn event of ``conversation_id``."""
    old = doc.conversations.get(conversation_id, ConversationEntry())
    conversations = dict(doc.conversations)
    conversations[conversation_id] = msgspec.structs.replace(old, conflicts=old.conflicts + 1)
    return msgspec.structs.replace(doc, conversations=conversations)


def transcripts_expected(doc: BatchDoc) -> Iterator[tuple[str, int, int]]:
    """``(conversation_id, attempt, turns)`` for every completed conversation with turns."""
    for conv, entry in doc.conversations.items():
        if entry.outcome == "completed" and entry.turns > 0:
            yield conv, entry.attempts, entry.turns


# --------------------------------------------------------------------------- room audit


def audit_target(room: str) -> tuple[str, str, int] | None:
    """``(batch_id, conversation_id, attempt)`` of a conversation room; None for other rooms."""
    parsed = parse_room_full(room)
    if parsed is None or not is_id(parsed[0]) or not is_token(parsed[1]):
        return None
    return parsed


def audit_fact(doc: BatchDoc, fact: RoomWebhook | LeaseEvent, seq: int | None = None) -> BatchDoc:
    """The document after one room-audit fact (a webhook, or a lease event with its stream
    sequence); the same object when it changes nothing. The room must be a conversation
    room of ``doc``'s batch (:func:`audit_target`)."""
    target = audit_target(fact.room)
    if target is None or target[0] != doc.batch_id:
        return doc
    _, conv, attempt = target
    old = doc.conversations.get(conv, ConversationEntry())
    participants, grants, rooms = old.participants, old.grants, old.rooms
    if isinstance(fact, RoomWebhook):
        participants, rooms = audit.add_webhook(participants, rooms, fact, attempt)
    else:
        grants = audit.add_lease(grants, fact, attempt, seq)
    participants, violations = audit.judge(participants, grants)
    entry = msgspec.structs.replace(
        old, participants=participants, grants=grants, rooms=rooms, violations=violations
    )
    if entry == old and conv in doc.conversations:
        return doc
    conversations = dict(doc.conversations)
    conversations[conv] = entry
    return msgspec.structs.replace(doc, conversations=conversations)
