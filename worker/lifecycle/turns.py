"""Turn-taking of one agent in one conversation: who speaks next, the turn index, when the call ends.

Pure: no I/O, no clock, no asyncio. The caller (worker/pair/conversation.py) feeds it what happened
in the room and does what it returns: reply, publish turn ``n``, end the call.

Between two crosstalk agents the customer speaks turn 0 and turns alternate, so each agent knows
the next index locally: its own turns are every other index from its first, and a turn heard from
the peer moves the next index to the one after it. Against the user's own agent (the target,
worker/simulator/customer.py) one job records both sides, so a target turn takes the next free index
(:meth:`Turns.peer_turn`): the target may speak first (a greeting) or several turns in a row (a
follow-up nobody asked for). The call ends after turn ``max_turns - 1``, when an agent asked for
the end (``end_conversation``) has said its goodbye, or when the peer says it ended.
"""

from __future__ import annotations

from typing import NamedTuple

from shared.contracts import Role


class End(NamedTuple):
    """The end of the call. ``mine``: this agent reports it (exactly one side does for a clean end)."""

    reason: str
    ok: bool
    mine: bool


class Speak(NamedTuple):
    """Publish and send the assistant's message as turn ``turn``, timed from ``started_at``."""

    turn: int
    started_at: float


class Turns:
    def __init__(self, role: Role, max_turns: int, *, heard_at: float = 0.0) -> None:
        self.role = role
        self.max_turns = max_turns
        self.next_turn = 0 if role == "customer" else 1
        self.last_turn = -1
        self.heard_at = heard_at  # when the peer's last turn arrived: the start of this agent's reply
        self.end_requested: str | None = None
        self.ended: End | None = None
        self.alone = False  # the peer left: nothing more is said to it
        self.waiting = False  # this agent's last turn waits for the peer's answer

    def heard(self, turn: int, at: float) -> End | None:
        """The peer spoke ``turn``: None means reply; an End (already recorded) means stop."""
        if self.ended is not None:
            return self.ended
        self.heard_at = at
        self.next_turn = turn + 1
        self.last_turn = max(self.last_turn, turn)
        self.waiting = False
        if self.next_turn >= self.max_turns:
            return self.finish(End("max_turns", ok=True, mine=False))
        return None

    def peer_turn(self, at: float, *, prompted: bool = True) -> tuple[int, End | None]:
        """A peer turn this agent records itself (the target's, worker/simulator/conversation.py): the next free
        index, whoever spoke the turn before, and what :meth:`heard` says of it.

        ``prompted=False``: the peer spoke on its own (a greeting, a follow-up, or words it began
        before this agent's last turn reached it): that answers nothing, and this agent's next turn,
        an answer to the peer's last answer, is timed from that answer.
        """
        turn, heard_at, waiting = self.last_turn + 1, self.heard_at, self.waiting
        end = self.heard(turn, at)
        if not prompted:
            self.heard_at, self.waiting = heard_at, waiting
        return turn, end

    def peer_gone(self) -> None:
        """The peer left the room: this agent says nothing more (whatever its model still produces)."""
        self.alone = True

    def speak(self, now: float, first_token_s: float | None, lease_lost: str | None = None) -> Speak | End | None:
        """The agent produced a message: which turn it is (None: past the last turn, say nothing).

        ``lease_lost``: why the role's lease may have ended; then never speak, the role may be
        someone else's by now.
        """
        if self.ended is not None or self.alone:
            return None
        if lease_lost is not None:
            return self.finish(End(f"lease_lost: {lease_lost}", ok=False, mine=True))
        turn = self.next_turn
        if turn >= self.max_turns:
            return None
        self.next_turn = turn + 2
        self.last_turn = max(self.last_turn, turn)
        self.waiting = True
        # turn 0 has no peer turn before it: it started when the model was asked
        started = self.heard_at if turn > 0 else now - (first_token_s or 0.0)
        return Speak(turn, started)

    def spoken(self, turn: int) -> End | None:
        """Turn ``turn`` is recorded: the end, if it was the goodbye or the last turn (tell the peer)."""
        if self.end_requested:
            return End(self.end_requested, ok=True, mine=True)
        if turn + 1 >= self.max_turns:
            return End("max_turns", ok=True, mine=True)
        return None

    def request_end(self, reason: str) -> None:
        self.end_requested = reason

    def control(self, message: dict[str, str]) -> End | None:
        """A control message from the peer: ``{"kind": "end", "reason": ...}`` ends the call."""
        if message.get("kind") == "end":
            return End(str(message.get("reason", "peer ended")), ok=True, mine=False)
        return None

    def finish(self, end: End) -> End:
        """Record the end; the first one stands. Returns the one that stands."""
        if self.ended is None:
            self.ended = end
        return self.ended

    @property
    def count(self) -> int:
        """Turns spoken in this conversation so far (both roles)."""
        return min(self.last_turn + 1, self.max_turns)


def peer_left(role: Role) -> End:
    return End(f"agent_left: {'support' if role == 'customer' else 'customer'}", ok=False, mine=True)


def turn_failed(role: Role, exc: BaseException) -> End:
    return End(f"agent_error: {role}: turn failed: {type(exc).__name__}: {exc}"[:300], ok=False, mine=True)


def model_failed(role: Role, exc: BaseException) -> End:
    """The model's completion broke (not retried): the reply is incomplete, so no turn is recorded."""
    return End(f"agent_error: {role}: model failed: {type(exc).__name__}: {exc}"[:300], ok=False, mine=True)


TIMEOUT = End("conversation_timeout", ok=False, mine=True)
