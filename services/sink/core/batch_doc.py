"""``batch.json`` as a pure fold of batch events, conversation ends and room-audit facts.

:func:`evolve` applies a batch event or a conversation end; :func:`audit_fact` a
webhook or lease event (the room audit, ``services/sink/audit.py``). Applying an event
twice changes nothing, so a document recovered from disk can take redeliveries of
events it already reflects. The document format (:class:`BatchDoc`) is a public contract
(docs/ARCHITECTURE.md, data directory): add fields, never rename.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

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
    id_problem,
    is_id,
    is_token,
)
from shared.rooms import parse_room_full

from .. import audit
from .voice import VoiceMetrics, VoiceSummary, summary

Status = Literal["running", "completed", "failed"]


class ConversationEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation in ``batch.json``: ``outcome`` once settled for good."""

    outcome: Literal["completed", "failed"] | None = None
    reason: str | None = None
    attempts: int = 0
    turns: int = 0
    ended: str | None = None  # how its latest attempt ended (ConversationEnded.reason)
    target_identity: str | None = None  # target_agent batches: the user's agent in the latest attempt's room
    conflicts: int = 0  # turn events kept out: an index already stored, with a different text
    # Room audit (livekit-server's webhooks joined with the allocator's grants; see audit.py).
    participants: list[audit.Participant] = []
    grants: list[audit.Grant] = []
    rooms: list[audit.RoomSeen] = []
    violations: list[audit.Violation] = []
    # voice mode: the recording's metrics (core/voice.py), once both channels are merged
    voice: VoiceMetrics | None = None


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
    target_agent: str | None = None  # the user's agent under test (batch.start target_agent)
    conversations: dict[str, ConversationEntry] = {}
    voice: VoiceSummary | None = None  # voice mode: over the recorded conversations


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
    return id_problem(batch_of(event), getattr(event, "conversation_id", None))


def batch_of(event: BatchDocEvent) -> str:
    return event.spec.batch_id if isinstance(event, BatchAccepted) else event.batch_id


def evolve(doc: BatchDoc, event: BatchDocEvent) -> BatchDoc:
    """The document after ``event``; the same object when the event changes nothing."""
    if isinstance(event, BatchAccepted):
        spec = event.spec
        return _copied(
            doc, spec, ("concurrency", "scenario", "language", "max_turns", "mode", "target_agent"),
            requested=spec.conversations if doc.status == "running" else doc.requested,
            started_at=doc.started_at if doc.started_at is not None else event.at,
        )
    if isinstance(event, BatchFinished):
        return _copied(doc, event, ("status", "requested", "completed", "failed", "started_at", "finished_at"))
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


def _copied(doc: BatchDoc, source: object, fields: tuple[str, ...], **more: Any) -> BatchDoc:
    """``doc`` with ``fields`` taken from ``source`` (same names) and ``more``; the same object
    when that changes nothing."""
    new = msgspec.structs.replace(doc, **{f: getattr(source, f) for f in fields}, **more)
    return doc if new == doc else new


def _entry(
    old: ConversationEntry, event: ConversationDispatched | ConversationSettled | ConversationEnded
) -> ConversationEntry:
    attempts = max(old.attempts, event.attempt)
    if isinstance(event, ConversationDispatched):
        return msgspec.structs.replace(old, attempts=attempts)
    if isinstance(event, ConversationEnded):
        latest = event.attempt >= old.attempts
        ended = event.reason if latest else old.ended
        target = event.target_identity if latest and event.target_identity else old.target_identity
        return msgspec.structs.replace(old, attempts=attempts, ended=ended, target_identity=target)
    if event.retry:  # not the final word: another attempt follows
        return msgspec.structs.replace(old, attempts=attempts)
    if old.outcome is not None and event.attempt < old.attempts:
        return msgspec.structs.replace(old, attempts=attempts)
    return msgspec.structs.replace(
        old, outcome=event.outcome, reason=event.reason, attempts=attempts, turns=event.turns
    )


def set_voice(doc: BatchDoc, conversation_id: str, metrics: VoiceMetrics) -> BatchDoc:
    """The conversation's voice metrics in, and the batch's summary over all recorded conversations."""
    old = doc.conversations.get(conversation_id, ConversationEntry())
    conversations = {**doc.conversations, conversation_id: msgspec.structs.replace(old, voice=metrics)}
    recorded = [e.voice for _, e in sorted(conversations.items()) if e.voice is not None]
    new = msgspec.structs.replace(doc, conversations=conversations, voice=summary(recorded))
    return doc if new == doc else new


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
