"""The room as crosstalk's simulated customer sees it (worker/simulator/customer.py): the target agent, its
state, its replies on ``lk.transcription`` (complete as worker/simulator/target_reply.py says), what it says
while nobody asked (unprompted: a greeting, a follow-up), and the customer's turns (text mode: on
``lk.chat``; voice mode: its microphone track carries them).

The target is the agent participant whose ``lk.agent.name`` is the batch's ``target_agent``:
livekit-agents (1.8.9, ``worker.py`` ``_on_accept``) sets that attribute on every job's
participant, so another agent in the room (someone else's, or a second dispatch) is never taken
for the target; it is ignored, logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from livekit import rtc

from shared.log import kv
from worker.simulator.target_reply import Reply

log = logging.getLogger("worker.simulator")

ATTR_AGENT_STATE = "lk.agent.state"
ATTR_AGENT_NAME = "lk.agent.name"
ATTR_SEGMENT = "lk.segment_id"
ATTR_TRACK = "lk.transcribed_track_id"
ATTR_FINAL = "lk.transcription_final"
TOPIC_CHAT = "lk.chat"
TOPIC_TRANSCRIPTION = "lk.transcription"
# livekit-agents publishes lk.agent.state once its session's RoomIO reads lk.chat; a message sent
# before that is dropped. An agent that never publishes a state is taken as ready this long after joining.
READY_GRACE_S = 3.0
QUIET_S = 0.5
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


class TargetLink:
    """The room as the simulated customer sees it: the target agent, its state, its replies, what it
    says unprompted.

    Duck-types :class:`worker.pair.bridge.RoomBridge` for :class:`Conversation` (``peer``,
    ``send_turn``, ``send_control``).
    """

    def __init__(self, room: rtc.Room, agent_name: str, voice: bool = False) -> None:
        self.room = room
        self.agent_name = agent_name
        self.voice = voice  # the customer speaks through its microphone track, never on lk.chat
        self.peer: rtc.RemoteParticipant | None = None
        self.reply: Reply | None = None
        self.on_reply: Callable[[Reply], None] = lambda reply: None
        self.on_sent: Callable[[int], None] = lambda turn: None
        self.on_heard: Callable[[str], None] = lambda text: None  # voice: the target's STT of the customer
        # what the target said while no customer turn waited for it: one turn per segment, in order
        self.on_unprompted: Callable[[Reply], None] = lambda said: None
        self.answered = 0  # replies delivered to on_reply
        self.unprompted = 0
        self._reads: set[asyncio.Future[None]] = set()
        self._said: asyncio.Future[None] | None = None  # the last unprompted segment, delivered in order
        self._ignored: set[str] = set()
        room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_stream)
        room.on("participant_attributes_changed", self._on_attributes)

    def is_target(self, p: rtc.Participant) -> bool:
        if p.kind != AGENT:
            return False
        name = p.attributes.get(ATTR_AGENT_NAME)
        if name == self.agent_name:
            return True
        if p.identity not in self._ignored:
            self._ignored.add(p.identity)
            log.warning("an agent that is not the target is in the room: ignored", extra=kv(
                room=self.room.name, identity=p.identity, agent_name=name, target=self.agent_name))
        return False

    async def wait_ready(self, timeout: float) -> rtc.RemoteParticipant | None:
        """The target once it can hear the customer and is quiet (None if it never joined within ``timeout``).

        Quiet: ``listening`` for ``QUIET_S`` with none of its text being read, so a greeting it says on
        its own (an unprompted turn) is over before the customer's first words, and is never taken
        for the answer to them.
        """
        loop = asyncio.get_running_loop()
        deadline, seen = loop.time() + timeout, {}
        quiet_since: float | None = None
        while loop.time() < deadline:
            for p in list(self.room.remote_participants.values()):
                if not self.is_target(p):
                    continue
                now = loop.time()
                first = seen.setdefault(p.identity, now)
                state = p.attributes.get(ATTR_AGENT_STATE)
                if state is None:
                    if now - first >= READY_GRACE_S:  # an agent that publishes no state
                        self.peer = p
                        return p
                    continue
                self.peer = p  # its text is read (and counted) from now on
                if state != "listening" or self._reads:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= QUIET_S:
                    return p
            await asyncio.sleep(0.05)
        return None

    async def send_turn(self, text: str, turn: int) -> None:
        assert self.peer is not None
        # the reply may arrive before send_text returns: expect it first
        self.reply = Reply(time.time(), self.peer.attributes.get(ATTR_AGENT_STATE))
        if self.voice:  # its speech has played out: the target heard it in the room
            self.on_sent(turn)
            return
        await self.room.local_participant.send_text(text, topic=TOPIC_CHAT, destination_identities=[self.peer.identity])
        self.on_sent(turn)

    async def send_control(self, kind: str, **fields: str) -> None:
        """Nothing to say: the target learns the call is over when the customer leaves (its job ends then)."""

    def _on_stream(self, reader: rtc.TextStreamReader, sender: str) -> None:
        attrs = reader.info.attributes or {}
        track = attrs.get(ATTR_TRACK)
        if self.peer is not None and track and track in self.room.local_participant.track_publications:
            # what the target's STT heard of the customer's track (RoomIO publishes it under the
            # customer's identity): its final text per segment
            if attrs.get(ATTR_FINAL) == "true":
                self._read_heard(reader)
            return
        if self.peer is None:  # its first words may come before its first state (wait_ready takes it then)
            p = self.room.remote_participants.get(sender)
            if p is not None and self.is_target(p):
                self.peer = p
        if self.peer is None or sender != self.peer.identity:
            return
        if track and track not in self.peer.track_publications:
            return  # the target's transcription of someone else's track, not its words
        segment = reader.info.attributes.get(ATTR_SEGMENT) or reader.info.stream_id
        reply = self.reply
        if reply is None:
            said = Reply(time.time(), self.peer.attributes.get(ATTR_AGENT_STATE))
            before, self._said = self._said, asyncio.get_running_loop().create_future()
            self._track(self._read_unprompted(reader, segment, said, before, self._said))
            return
        reply.opened(time.time())

        async def read() -> None:
            try:
                text = await reader.read_all()
            except Exception:
                reply.failed()
                self._check(reply)
                return
            reply.closed(segment, text, time.time())
            self._check(reply)

        self._track(read())

    async def _read_unprompted(self, reader: rtc.TextStreamReader, segment: str, said: Reply,
                               before: asyncio.Future[None] | None, done: asyncio.Future[None]) -> None:
        """A segment the target began while no customer turn waited for it: a turn of its own (one
        per segment: nothing marks where an unprompted utterance ends), delivered after the
        unprompted segments that began before it."""
        said.opened(said.sent_at)
        try:
            try:
                text = await reader.read_all()
            except Exception:
                return  # cut off (the target left mid-sentence): nothing it finished saying
            said.closed(segment, text, time.time())
            if before is not None:
                await before
            if said.read_in_full():
                self.unprompted += 1
                log.info("the target spoke unprompted", extra=kv(room=self.room.name, n=self.unprompted))
                self.on_unprompted(said)
        finally:
            done.set_result(None)

    async def settle(self, timeout: float) -> None:
        """Until the target's text being read is in (at most ``timeout``)."""
        if self._reads:
            await asyncio.wait(set(self._reads), timeout=timeout)

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    def _read_heard(self, reader: rtc.TextStreamReader) -> None:
        async def read() -> None:
            try:
                text = await reader.read_all()
            except Exception:
                return
            if text.strip():
                self.on_heard(text.strip())

        self._track(read())

    def _on_attributes(self, changed: dict[str, str], p: rtc.Participant) -> None:
        reply = self.reply
        if reply is not None and self.peer is not None and p.identity == self.peer.identity and ATTR_AGENT_STATE in changed:
            reply.state = changed[ATTR_AGENT_STATE]
            self._check(reply)

    def take_read(self) -> Reply | None:
        """The reply being awaited, taken as answered if its words are in (read in full), else None."""
        reply = self.reply
        if reply is None or not reply.read_in_full():
            return None
        self.reply = None
        self.answered += 1
        return reply

    def _check(self, reply: Reply) -> None:
        if reply is not self.reply or not reply.complete():
            return
        if not reply.text.strip():  # an empty transcription is no answer: keep waiting for one
            self.reply = Reply(reply.sent_at, reply.state)
            return
        self.reply = None
        self.answered += 1
        self.on_reply(reply)
