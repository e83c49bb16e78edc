"""One conversation's transcript file as a pure fold of its turn events, with no I/O.

:class:`Transcript` is what one conversation file holds (its attempt and how many turns)
plus out-of-order turns held until their gap fills. :func:`offer` decides what a turn
event does: append a run of lines, start a new attempt (replace the file), count a
duplicate, drop a stale attempt, keep out a conflicting text, or hold it. Every ack
handle that comes in goes out again in exactly one step, to be settled once the step's
lines are durable; the caller never acks anything the core did not release.

The line format (:class:`TurnLine`) is a public contract (docs/ARCHITECTURE.md, data
directory): add fields, never rename. Nothing here assumes the roles alternate: a turn's place is
its index, whoever speaks it (the user's own agent may greet first or say two turns in a row).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Generic, Literal, TypeVar

import msgspec

from shared.contracts import TurnRecorded, id_problem

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
    # said while no turn of the other role waited for it (a target's greeting or follow-up): turns
    # of one role may follow each other, the index is the order they were said in
    unprompted: bool = False


class VoiceTurnLine(TurnLine, frozen=True, kw_only=True):
    """A voice-mode line: where the turn's speech lies in ``recordings/<conversation_id>.wav``
    (seconds), what the listener heard and how (``stt`` or ``speaker_text``)."""

    audio_start_s: float | None = None
    audio_end_s: float | None = None
    heard_text: str | None = None
    heard_via: str | None = None


_line_encoder = msgspec.json.Encoder()
_line_decoder = msgspec.json.Decoder(TurnLine)
_voice_line_decoder = msgspec.json.Decoder(VoiceTurnLine)


def encode_line(turn: TurnRecorded) -> bytes:
    """The turn as one JSON line: UTF-8 as is (Devanagari stays the same bytes), ``\\n`` ended."""
    voice = turn.heard_via is not None or turn.audio_start_s is not None or turn.heard_text is not None
    cls = VoiceTurnLine if voice else TurnLine
    line = cls(**{f: getattr(turn, f) for f in cls.__struct_fields__})
    return _line_encoder.encode(line) + b"\n"


def decode_voice_line(data: bytes) -> VoiceTurnLine:
    return _voice_line_decoder.decode(data)


def decode_line(data: bytes) -> TurnLine:
    return _line_decoder.decode(data)


def turn_problem(turn: TurnRecorded) -> tuple[str, str] | None:
    """``(field, reason)`` if the turn must not be stored, else ``None``.

    The ids become a directory and a file name: a decoded turn's ids passed their rule
    already, a turn built in code is checked here (and the path is checked again under the
    data dir by the store).
    """
    problem = id_problem(turn.batch_id, turn.conversation_id)
    if problem is not None:
        return problem
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
