"""The conversation of crosstalk's customer with the user's agent (the target), text mode: the
target's replies and unprompted words are turns this job records (its support side under the lease
held for it), and the customer answers them. Voice mode's differences: worker/simulator/voice_conversation.py;
the call's flow: worker/simulator/customer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from livekit import rtc
from livekit.agents import Agent, AgentSession
from nats.js import JetStreamContext

from shared.config import Settings
from shared.contracts import HeardVia, JobMetadata
from worker.lifecycle import lease
from worker.lifecycle.reports import Reports
from worker.lifecycle.turns import End
from worker.pair.conversation import Conversation
from worker.simulator.target_link import TargetLink
from worker.simulator.target_reply import Reply, left_reason, overdue_reason

# The target's last words travel on the data channel, its leaving on the signalling connection: the
# leave may arrive while its last segment is still being read. This long for those reads to finish.
LEFT_READ_S = 2.0
# A reply read in full when the target left is recorded before the end (voice mode: once heard,
# which waits for the STT: worker/simulator/voice_conversation.py STT_GRACE_S); past this, the end goes without it.
LEFT_RECORD_S = 15.0


class SimConversation(Conversation):
    """:class:`Conversation` with the target as the peer: its replies are turns this job records."""

    def __init__(self, *, reports: Reports, link: TargetLink, keeper: lease.LeaseKeeper, reply_s: float) -> None:
        super().__init__(reports=reports, bridge=link, lease=keeper)  # type: ignore[arg-type]
        self.link = link
        self.reply_s = reply_s
        self.target_turns = 0
        self.target: Reports | None = None  # the support side's reports, under the lease held for the target
        self.session: AgentSession | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.span: tuple[float, float] | None = None  # voice: where the customer's last turn lies in the room
        # what the target said on its own before its lease was held (a greeting): recorded first
        self._early: list[Reply] | None = []
        self._recorded = asyncio.Event()  # a target turn was recorded
        link.on_reply = self.on_reply
        link.on_sent = self.on_sent
        link.on_unprompted = self.on_unprompted

    def on_sent(self, turn: int) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(self.reply_s, self._overdue)

    def _overdue(self) -> None:
        reason = overdue_reason(self.target_turns, self.link.agent_name, self.reply_s, "CROSSTALK_TARGET_REPLY_S")
        self.finish(End(reason, ok=False, mine=True))

    def on_reply(self, reply: Reply) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._track(self._heard(reply))

    def on_unprompted(self, said: Reply) -> None:
        if self._early is not None:
            self._early.append(said)
            return
        self._track(self._record(said, prompted=False))

    async def record_early(self) -> str:
        """Record what the target said before its lease was held; the text the customer answers first."""
        assert self._early is not None
        said: list[str] = []
        while self._early:
            first = self._early.pop(0)
            await self._record(first, prompted=False)
            said.append(first.text)
        self._early = None  # no await since the list was last seen empty: nothing is left behind
        return "\n".join(said)

    async def _heard(self, reply: Reply, heard: str | None = None, span: tuple[float, float] | None = None,
                     via: HeardVia | None = None) -> None:
        """The target's answer, in full: its own words, and in voice mode what the customer heard, and where."""
        await self._record(reply, prompted=True, heard=heard, span=span, via=via)

    async def _record(self, said: Reply, *, prompted: bool, heard: str | None = None,
                      span: tuple[float, float] | None = None, via: HeardVia | None = None) -> None:
        """A target turn: an answer (``prompted``: the customer answers it in turn) or said on its own."""
        async with self._speaking:
            if self.done.done() or self.target is None:
                return
            held = self.target.lease
            if held is not None and not held.valid():
                self.finish(End(f"lease_lost: support, held for the target: {held.lost or 'not renewed in time'}",
                                ok=False, mine=True))
                return
            turn, end = self.turns.peer_turn(time.time(), prompted=prompted)
            span = span if prompted else self.unprompted_span()
            await self.target.turn(turn, said.text, started_at=said.started_at or said.sent_at,
                                   ended_at=said.ended_at or time.time(),
                                   first_token_s=said.first_token_s if prompted else None,
                                   audio_start_s=self._offset(span[0]) if span else None,
                                   audio_end_s=self._offset(span[1]) if span else None,
                                   heard_text=heard, heard_via=via, unprompted=not prompted)
            if prompted:
                self.target_turns += 1
            self._recorded.set()
            if end is not None:
                self.finish(end._replace(mine=True))
            elif prompted and self.session is not None and not self.turns.alone:
                self.answer(said, heard)

    def answer(self, reply: Reply, heard: str | None) -> None:
        """The customer's next turn, in answer to the target's words (text mode: as published)."""
        assert self.session is not None
        self.session.generate_reply(user_input=reply.text)

    def unprompted_span(self) -> tuple[float, float] | None:
        """Voice mode: where the target's unprompted turn lies in the room's audio, taken so that its
        speech is not counted in the next answer's span (text mode: nowhere)."""
        return None

    def _offset(self, at: float | None) -> float | None:
        """A wall time as an offset in the recording (voice mode: :mod:`worker.simulator.voice_conversation`)."""
        return None

    def turn_audio(self) -> dict[str, Any]:
        span = self.span
        return {"audio_start_s": self._offset(span[0]), "audio_end_s": self._offset(span[1])} if span else {}

    def on_peer_left(self, participant: rtc.RemoteParticipant) -> None:
        peer = self.link.peer
        if peer is None or participant.identity != peer.identity or self.done.done():
            return
        self.turns.peer_gone()  # the customer says nothing more, whatever its model still produces
        if self._deadline is not None:
            self._deadline.cancel()
        # Was a customer turn waiting for its answer when it left (decided now, not after the reads)?
        # An answer already complete but not yet recorded answered it.
        asked = self.turns.waiting and self.link.answered == self.target_turns
        self._track(self._target_left(peer.identity, asked=asked, answered=self.link.answered))

    async def _target_left(self, identity: str, *, asked: bool, answered: int) -> None:
        await self.link.settle(LEFT_READ_S)
        if asked and self.link.answered > answered:
            asked = False  # its answer completed while the last reads came in
        reply = self.link.take_read() if asked else None
        if reply is not None:  # it said its answer and hung up before its state came back to listening
            asked = False
            self._recorded.clear()
            self.on_reply(reply)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recorded.wait(), LEFT_RECORD_S)
        reason, ok = left_reason(asked=asked, answered=self.link.answered, agent=self.link.agent_name,
                                 identity=identity)
        async with self._speaking:  # a turn being recorded is in the transcript before the end is reported
            self.finish(End(reason, ok=ok, mine=True))

    async def start_session(self, settings: Settings, agent: Agent, peer: rtc.RemoteParticipant) -> None:
        """Text mode: the session reads and writes through this class (no room I/O of its own)."""
        assert self.session is not None
        await self.session.start(agent, record=False, session_host=False)

    async def store_recording(self, js: JetStreamContext, meta: JobMetadata) -> None:
        """Voice mode's recording (text mode: none)."""

    async def aclose(self) -> None:
        """What voice mode opened besides the session (text mode: nothing)."""

    def finish(self, end: End) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().finish(end)
