"""The room as crosstalk's simulated customer sees it (worker/simulator.py): the target agent, its
state, its replies on ``lk.transcription`` (complete as worker/target_reply.py says), and the
customer's turns (text mode: on ``lk.chat``; voice mode: its microphone track carries them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from livekit import rtc

from shared.log import kv
from worker.target_reply import Reply

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
    """The room as the simulated customer sees it: the target agent, its state, its replies.

    Duck-types :class:`worker.bridge.RoomBridge` for :class:`Conversation` (``peer``,
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
        self.unsolicited = 0
        self._reads: set[asyncio.Future[None]] = set()
        room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_stream)
        room.on("participant_attributes_changed", self._on_attributes)

    def is_target(self, p: rtc.RemoteParticipant) -> bool:
        name = p.attributes.get(ATTR_AGENT_NAME)
        return p.kind == AGENT and (name is None or name == self.agent_name)

    async def wait_ready(self, timeout: float) -> rtc.RemoteParticipant | None:
        """The target once it can hear the customer and is quiet (None if it never joined within ``timeout``).

        Quiet: ``listening`` for ``QUIET_S`` with none of its text being read, so a greeting it says on
        its own (not a turn: counted, logged) is over before the customer's first words, and is
        never taken for the answer to them.
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
        if self.peer is None or sender != self.peer.identity:
            return
        if track and track not in self.peer.track_publications:
            return  # the target's transcription of someone else's track, not its words
        reply = self.reply
        if reply is None:
            self.unsolicited += 1
            log.info("target text while nobody asked: not a turn", extra=kv(room=self.room.name, sender=sender))
        else:
            reply.opened(time.time())
        segment = reader.info.attributes.get(ATTR_SEGMENT) or reader.info.stream_id

        async def read() -> None:
            try:
                text = await reader.read_all()
            except Exception:
                if reply is not None:
                    reply.failed()
                    self._check(reply)
                return
            if reply is not None:
                reply.closed(segment, text, time.time())
                self._check(reply)

        task = asyncio.ensure_future(read())
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

        task = asyncio.ensure_future(read())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    def _on_attributes(self, changed: dict[str, str], p: rtc.Participant) -> None:
        reply = self.reply
        if reply is not None and self.peer is not None and p.identity == self.peer.identity and ATTR_AGENT_STATE in changed:
            reply.state = changed[ATTR_AGENT_STATE]
            self._check(reply)

    def _check(self, reply: Reply) -> None:
        if reply is not self.reply or not reply.complete():
            return
        if not reply.text.strip():  # an empty transcription is no answer: keep waiting for one
            self.reply = Reply(reply.sent_at, reply.state)
            return
        self.reply = None
        self.on_reply(reply)
