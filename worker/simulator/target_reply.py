"""When the user's agent (the target) has finished answering one customer turn. Pure: no I/O, no clock.

A livekit-agents agent publishes what it says on ``lk.transcription``, one text stream per
segment (``lk.segment_id``), and its state as the participant attribute ``lk.agent.state``:
``listening`` → ``thinking`` → ``speaking`` → ``listening`` for one reply (measured against
livekit-server 1.13.5, text mode: the final segment arrives before the state returns to
``listening``). So a reply is complete when at least one segment has been read in full, no
segment is still being read, and the agent is not ``thinking`` or ``speaking`` (an agent that
publishes no state at all: as soon as its segments are read). A reply of several segments (a
tool call between two sentences) is one turn, its segments joined by a newline in the order
they began; each segment's text is kept exactly as the agent published it (a segment streamed
twice under one id keeps its last full text).

Times are the room's, as crosstalk's customer saw it: ``started_at`` when the first segment
began to arrive, ``ended_at`` when the last one was read in full.
"""

from __future__ import annotations

BUSY_STATES = frozenset({"thinking", "speaking"})


class Reply:
    """The target's answer to the customer turn sent at ``sent_at``."""

    def __init__(self, sent_at: float, state: str | None) -> None:
        self.sent_at = sent_at
        self.state = state
        self.segments: dict[str, str] = {}
        self.reading = 0
        self.started_at: float | None = None
        self.ended_at: float | None = None

    def opened(self, at: float) -> None:
        self.reading += 1
        if self.started_at is None:
            self.started_at = at

    def closed(self, segment: str, text: str, at: float) -> None:
        self.reading = max(0, self.reading - 1)
        self.segments[segment] = text
        self.ended_at = at

    def failed(self) -> None:
        """A segment that could not be read in full (the target left mid-stream)."""
        self.reading = max(0, self.reading - 1)

    def complete(self) -> bool:
        return bool(self.segments) and self.reading == 0 and self.state not in BUSY_STATES

    def read_in_full(self) -> bool:
        """Its words are in: what an agent that hangs up right after speaking leaves (its state never
        comes back to ``listening``)."""
        return bool(self.segments) and self.reading == 0 and bool(self.text.strip())

    @property
    def text(self) -> str:
        return "\n".join(self.segments.values())

    @property
    def first_token_s(self) -> float | None:
        return None if self.started_at is None else max(0.0, self.started_at - self.sent_at)


def left_reason(*, asked: bool, answered: int, agent: str, identity: str) -> tuple[str, bool]:
    """Why the conversation ends when the target leaves the room, and whether that is a normal end.

    Leaving after answering the last thing said is how an agent ends a call: the conversation ends
    as ended by support (``end_conversation: support``, services/judge/checks.py ``ended_by``) and
    the scenario's checks decide. Leaving with a reply owed, or before answering anything, is the
    agent's failure (``target_left``).
    """
    if asked or answered == 0:
        return (f"target_left: agent {agent!r} ({identity}) left the room "
                + ("with a reply owed" if asked else "before answering anything")
                + f" after {answered} answer(s)"), False
    return f"end_conversation: support (agent {agent!r} left the room after answering)", True


def overdue_reason(target_turns: int, agent: str, reply_s: float, variable: str) -> str:
    """Why the conversation ends when a reply is late: the agent never spoke, or stopped answering."""
    if target_turns == 0:
        return f"target_silent: agent {agent!r} joined but did not answer within {reply_s:g} s ({variable})"
    return (f"target_unresponsive: agent {agent!r} answered {target_turns} turn(s), then did not answer "
            f"within {reply_s:g} s ({variable})")
