"""How two agents talk through a LiveKit room (text mode).

livekit-agents publishes an agent's own words as a transcription (``lk.transcription``)
and reads user text only from ``lk.chat`` sent by the linked participant, so
agent-to-agent text needs a bridge: every assistant message also goes to the
peer on ``lk.chat`` (``send_text(destination_identities=[peer])``), carrying its
turn index as a stream attribute. Control messages (end of call) travel on their
own topic. Roles and readiness are participant attributes, so a message is never
sent before the peer listens, and any observer in the room can see who is who.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from livekit import rtc

from shared.contracts import Role

TOPIC_CHAT = "lk.chat"
TOPIC_CONTROL = "crosstalk.control"
ATTR_ROLE = "crosstalk.role"
ATTR_READY = "crosstalk.ready"
ATTR_TURN = "crosstalk.turn"


def peer_role(role: Role) -> Role:
    return "support" if role == "customer" else "customer"


class RoomBridge:
    def __init__(self, room: rtc.Room, role: Role) -> None:
        self.room = room
        self.role = role
        self.peer: rtc.RemoteParticipant | None = None

    async def announce(self, *, ready: bool = False) -> None:
        attrs = {ATTR_ROLE: self.role}
        if ready:
            attrs[ATTR_READY] = "1"
        await self.room.local_participant.set_attributes(attrs)

    async def wait_for_peer(self, *, ready: bool, timeout: float) -> rtc.RemoteParticipant:
        """The other agent of this conversation (its role attribute is the opposite of ours)."""
        want = peer_role(self.role)

        def match() -> rtc.RemoteParticipant | None:
            for p in self.room.remote_participants.values():
                if p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                    continue
                if p.attributes.get(ATTR_ROLE) != want:
                    continue
                if ready and p.attributes.get(ATTR_READY) != "1":
                    continue
                return p
            return None

        found = asyncio.get_running_loop().create_future()

        def check(*_: object) -> None:
            p = match()
            if p is not None and not found.done():
                found.set_result(p)

        events = ("participant_connected", "participant_attributes_changed")
        for ev in events:
            self.room.on(ev, check)
        try:
            check()
            self.peer = await asyncio.wait_for(found, timeout)
            return self.peer
        finally:
            for ev in events:
                self.room.off(ev, check)

    async def send_turn(self, text: str, turn: int) -> None:
        assert self.peer is not None
        await self.room.local_participant.send_text(
            text,
            topic=TOPIC_CHAT,
            destination_identities=[self.peer.identity],
            attributes={ATTR_TURN: str(turn), ATTR_ROLE: self.role},
        )

    async def send_control(self, kind: str, **fields: str) -> None:
        if self.peer is None:
            return
        await self.room.local_participant.send_text(
            json.dumps({"kind": kind, **fields}),
            topic=TOPIC_CONTROL,
            destination_identities=[self.peer.identity],
        )

    def on_control(self, handler: Callable[[dict[str, str], str], None]) -> None:
        """``handler(message, sender_identity)`` for control messages from the peer."""

        def _on_stream(reader: rtc.TextStreamReader, sender: str) -> None:
            async def _read() -> None:
                body = await reader.read_all()
                try:
                    msg = json.loads(body)
                except ValueError:
                    return
                if isinstance(msg, dict):
                    handler(msg, sender)

            asyncio.ensure_future(_read())

        self.room.register_text_stream_handler(TOPIC_CONTROL, _on_stream)
