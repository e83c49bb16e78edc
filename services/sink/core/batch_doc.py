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
    BatchCancelled,
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
from .voice import NO_AUDIO, RECORDING_MISSING, VoiceMetrics, VoiceSummary, summary

Status = Literal["running", "completed", "failed", "cancelled"]  # cancelled: batch.cancel (BatchFinished says)


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
    # voice mode: the recording's metrics (core/voice.py), once both channels of the latest attempt
    # are merged; only the settled attempt's stay (an older attempt's are dropped, never shown)
    voice: VoiceMetrics | None = None


class BatchDoc(msgspec.Struct, frozen=True, kw_only=True):
    """``batches/<batch_id>/batch.json``. ``requested`` is the spec's ``conversations``."""

    batch_id: str
    status: Status = "running"
    requested: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0  # never started, the batch cancelled (BatchFinished.cancelled)
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
    | BatchCancelled
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
        new = _copied(doc, event, ("status", "requested", "completed", "failed", "cancelled", "started_at",
                                   "finished_at"))
        return mark_recording_missing(new)
    if isinstance(event, ConversationJoined | BatchCancelled):  # a cancel shows in BatchFinished's status
        return doc
    old = doc.conversations.get(event.conversation_id, ConversationEntry())
    entry = _entry(old, event)
    if entry.voice is not None and 0 < entry.voice.attempt < entry.attempts:
        entry = msgspec.structs.replace(entry, voice=None)  # a newer attempt runs: the older one's figures go
    if entry == old and event.conversation_id in doc.conversations:
        return doc
    conversations = dict(doc.conversations)
    conversations[event.conversation_id] = entry
    completed, failed = doc.completed, doc.failed
    if doc.status == "running":  # once finished, BatchFinished's counts are the word
        completed += (entry.outcome == "completed") - (old.outcome == "completed")
        failed += (entry.outcome == "failed") - (old.outcome == "failed")
    new = msgspec.structs.replace(doc, conversations=conversations, completed=completed, failed=failed)
    if entry.voice != old.voice or voice_fault(entry) != voice_fault(old):
        new = msgspec.structs.replace(new, voice=_summary(new))
    return new


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
    """The conversation's voice metrics in, and the batch's summary over all recorded conversations.

    Only the latest attempt's recording counts: metrics of an attempt older than one the document
    knows (dispatched, settled or recorded) change nothing, so a failed attempt's late channel never
    replaces the settled attempt's figures. A conversation failed as ``recording_missing`` whose
    recording does arrive after all is completed again (its counts and the batch's status follow).
    """
    old = doc.conversations.get(conversation_id, ConversationEntry())
    if stale_recording(old, metrics.attempt):
        return doc
    entry = msgspec.structs.replace(old, voice=metrics)
    completed, failed, status = doc.completed, doc.failed, doc.status
    if entry.outcome == "failed" and voice_fault(entry) == RECORDING_MISSING:
        was = (entry.reason or "").partition(_WAS)[2] or entry.ended
        entry = msgspec.structs.replace(entry, outcome="completed", reason=was)
        completed, failed = completed + 1, failed - 1
        if status == "failed" and failed == 0:
            status = "completed"
    conversations = {**doc.conversations, conversation_id: entry}
    new = msgspec.structs.replace(doc, conversations=conversations, completed=completed, failed=failed,
                                  status=status)
    new = msgspec.structs.replace(new, voice=_summary(new))
    return doc if new == doc else new


_WAS = "; completed as: "  # a recording_missing reason keeps the completed reason it replaced


def stale_recording(entry: ConversationEntry, attempt: int) -> bool:
    """True if a recording of ``attempt`` is older than what ``entry`` already knows of."""
    newest = max(entry.attempts, entry.voice.attempt if entry.voice is not None else 0)
    return 0 < attempt < newest


def superseded_recording(old: BatchDoc, new: BatchDoc, event: BatchDocEvent) -> str | None:
    """The conversation whose ``recordings/<id>.wav`` ``event`` made an older attempt's, else None: a
    newer attempt of a voice conversation was dispatched. Its figures leave the document (:func:`evolve`)
    and the file goes with them (services/sink/docs.py), so nothing links a recording ``batch.json``
    does not vouch for: a settled attempt whose own recording never arrives says ``recording_missing``
    with no older attempt's file beside it."""
    if new.mode != "voice" or not isinstance(event, ConversationDispatched):
        return None
    before, after = old.conversations.get(event.conversation_id), new.conversations.get(event.conversation_id)
    if before is None or after is None or not 0 < before.attempts < after.attempts:
        return None
    if after.voice is not None and after.voice.attempt >= event.attempt:
        return None  # the sink read the dispatch late: the file on disk is already this attempt's own
    return event.conversation_id


def voice_fault(entry: ConversationEntry) -> str | None:
    """``recording_missing`` or ``no_audio`` if that is why the conversation failed, else None.

    The dispatcher prefixes a reason it has no label for with ``other: `` (services/dispatcher/core.py
    ``normalize_reason``, labels in shared/metrics.py ``REASONS``), so the name is looked for there too.
    """
    if entry.outcome != "failed" or not entry.reason:
        return None
    head = entry.reason.removeprefix("other:").lstrip().split(":", 1)[0].strip()
    return head if head in (RECORDING_MISSING, NO_AUDIO) else None


def _summary(doc: BatchDoc) -> VoiceSummary | None:
    """The batch's voice summary: the recorded conversations' figures and the voice faults by name."""
    recorded = [e.voice for _, e in sorted(doc.conversations.items()) if e.voice is not None]
    faults: dict[str, int] = {}
    for e in doc.conversations.values():
        name = voice_fault(e)
        if name is not None:
            faults[name] = faults.get(name, 0) + 1
    if not recorded and not faults and doc.voice is None:
        return None
    return summary(recorded, faults)


def recordings_missing(doc: BatchDoc) -> list[str]:
    """The completed voice conversations with turns whose recording is not merged (yet): what a
    ``BatchFinished`` can wait for, as it waits for short transcripts, before :func:`mark_recording_missing`."""
    if doc.mode != "voice":
        return []
    return sorted(c for c, e in doc.conversations.items() if e.outcome == "completed" and e.voice is None and e.turns)


def mark_recording_missing(doc: BatchDoc) -> BatchDoc:
    """Fail, as ``recording_missing``, every completed voice conversation without its recording.

    Applied with ``BatchFinished`` (``doc`` carries that event's counts, in which these conversations
    are completed): a recording the sink has not merged by then is missing, and the conversation says
    so instead of quietly leaving the voice summary. Like a short transcript, it moves the conversation
    to ``failed`` and the batch with it. Each listener uploads its channel before it reports an end
    (worker/job.py, worker/simulator/customer.py), but the dispatcher settles on the first end, so the other
    channel may still be on its way: a recording that arrives after all puts the conversation back
    (:func:`set_voice`). Applying it again, or the event again, gives the same document.
    """
    conversations = dict(doc.conversations)
    for conv in recordings_missing(doc):
        entry = conversations[conv]
        reason = f"{RECORDING_MISSING}: no recording of attempt {entry.attempts} reached the sink{_WAS}{entry.reason}"
        conversations[conv] = msgspec.structs.replace(entry, outcome="failed", reason=reason)
    missing = sum(1 for e in conversations.values() if voice_fault(e) == RECORDING_MISSING)
    if not missing:
        return doc
    new = msgspec.structs.replace(doc, conversations=conversations, completed=doc.completed - missing,
                                  failed=doc.failed + missing, status=_failed(doc))
    return msgspec.structs.replace(new, voice=_summary(new))


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
                                   failed=doc.failed + moved, status=_failed(doc))


def _failed(doc: BatchDoc) -> Status:
    """The status once a conversation fails after the batch finished: ``failed``, but a cancelled batch stays so."""
    return "cancelled" if doc.status == "cancelled" else "failed"


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
