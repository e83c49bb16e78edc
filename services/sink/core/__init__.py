"""The transcript sink's decisions, with no I/O: two folds of events.

* :mod:`.transcript`: one conversation file (:class:`Transcript`, :func:`offer`).
* :mod:`.batch_doc`: one batch's ``batch.json`` (:class:`BatchDoc`, :func:`evolve`,
  :func:`audit_fact`).
"""

from .batch_doc import (
    TRANSCRIPT_INCOMPLETE,
    BatchDoc,
    BatchDocEvent,
    ConversationEntry,
    Status,
    audit_fact,
    audit_target,
    batch_of,
    decode_doc,
    encode_doc,
    event_problem,
    evolve,
    flag_conflict,
    mark_incomplete,
    recordings_missing,
    set_voice,
    superseded_recording,
    transcripts_expected,
)
from .transcript import (
    MAX_TURN,
    FileWrite,
    Outcome,
    Step,
    Transcript,
    TurnLine,
    decode_line,
    encode_line,
    offer,
    repeats_stored,
    turn_problem,
)

__all__ = [
    "recordings_missing", "superseded_recording",
    "MAX_TURN", "TRANSCRIPT_INCOMPLETE", "BatchDoc", "BatchDocEvent", "ConversationEntry", "FileWrite", "Outcome",
    "Status", "Step", "Transcript", "TurnLine", "audit_fact", "audit_target", "batch_of", "decode_doc",
    "decode_line", "encode_doc", "encode_line", "event_problem", "evolve", "flag_conflict", "mark_incomplete",
    "offer", "repeats_stored", "set_voice", "transcripts_expected", "turn_problem",
]
