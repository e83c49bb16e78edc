"""The worker's transcription output, through a real livekit-server, seen by a hidden observer."""

from __future__ import annotations

import asyncio
from typing import Any

from livekit import api, rtc
from support.servers import Server

from worker.lifecycle.server import init_rtc
from worker.voice.transcription import ATTR_FINAL, ATTR_SEGMENT, TOPIC, CoalescedTranscription

TURNS = [
    "Hello, thank you for calling. How can I help you with your account today?",
    "मुझे अपने खाते का पासवर्ड बदलना है, लेकिन OTP नहीं आ रहा।",
    "Ek second, main check karti hoon — aapka registered number kya hai?",
]


def token(name: str, room: str, *, hidden: bool = False) -> str:
    grants = api.VideoGrants(room_join=True, room=room, hidden=hidden, can_update_own_metadata=True)
    return api.AccessToken("devkey", "secret").with_identity(name).with_grants(grants).to_jwt()


def words(text: str) -> list[str]:
    """LLM-like deltas: each word with its leading space, concatenating back to ``text``."""
    out, cur = [], ""
    for ch in text:
        if ch == " " and cur:
            out.append(cur)
            cur = ""
        cur += ch
    return [*out, cur]


async def test_each_turn_is_one_final_stream_in_few_chunks(livekit_server: Server, unique: str) -> None:
    init_rtc()
    name = f"transcription-{unique}"
    http = livekit_server.url.replace("ws://", "http://")
    async with api.LiveKitAPI(http, "devkey", "secret") as lk:
        await lk.room.create_room(api.CreateRoomRequest(name=name, empty_timeout=60))

    observer, agent = rtc.Room(), rtc.Room()
    received: list[dict[str, Any]] = []
    readers: list[asyncio.Task[None]] = []

    def on_stream(reader: rtc.TextStreamReader, sender: str) -> None:
        opened = dict(reader.info.attributes or {})  # the header, before any text

        async def read() -> None:
            chunks = [chunk async for chunk in reader]
            received.append({"sender": sender, "text": "".join(chunks), "chunks": len(chunks),
                             "opened": opened, "closed": dict(reader.info.attributes or {})})
        readers.append(asyncio.ensure_future(read()))

    observer.register_text_stream_handler(TOPIC, on_stream)
    await observer.connect(livekit_server.url, token("observer", name, hidden=True))
    await agent.connect(livekit_server.url, token("agent-1", name))
    try:
        out = CoalescedTranscription(agent, interval_s=0.2)
        deltas = 0
        for turn in TURNS:
            for w in words(turn):
                await out.capture_text(w)
                deltas += 1
                await asyncio.sleep(0.01)  # ~100 tokens/s, like a fast model
            out.flush()
        out.flush()  # a flush without text is a no-op
        await out.aclose()
        for _ in range(200):
            if len(received) == len(TURNS):
                break
            await asyncio.sleep(0.05)
    finally:
        await agent.disconnect()
        await observer.disconnect()
        for task in readers:
            task.cancel()

    assert [r["text"] for r in received] == TURNS  # every turn, whole, in order, UTF-8 byte-exact
    assert [r["text"].encode() for r in received] == [t.encode() for t in TURNS]
    assert all(r["sender"] == "agent-1" for r in received)
    assert all(r["opened"].get(ATTR_FINAL) == "false" and r["opened"].get(ATTR_SEGMENT) for r in received)
    assert all(r["closed"].get(ATTR_FINAL) == "true" for r in received)  # the trailer marks the turn final
    assert len({r["opened"][ATTR_SEGMENT] for r in received}) == len(TURNS)  # one segment per turn
    # a few chunks per turn instead of one per word
    assert out.chunks_written < deltas / 2, (out.chunks_written, deltas)
    assert sum(r["chunks"] for r in received) == out.chunks_written
