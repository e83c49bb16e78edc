"""The real servers come up: a JetStream stream round-trips a message, a LiveKit room is created and listed."""

from __future__ import annotations

from livekit import api

from shared import bus, streams, subjects
from shared.contracts import BatchAccepted, BatchEvent, BatchSpec, decode_event


async def test_jetstream_streams_and_roundtrip(nats_url: str, unique: str) -> None:
    nc = await bus.connect(nats_url, "test")
    js = await bus.jetstream(nc)
    await streams.ensure_streams(js)  # idempotent: a second process starting finds them
    names = {s.config.name for s in await js.streams_info()}
    assert {c.name for c in streams.ALL_STREAMS} <= names
    spec = BatchSpec(batch_id=f"t-{unique}", conversations=1, concurrency=1, scenario="en-account-help",
                     language="hi", max_turns=2, mode="text")
    ack = await bus.publish(js, subjects.batch_events(spec.batch_id), BatchAccepted(spec=spec, at=1.0))
    msg = await js.get_msg("BATCH_EVENTS", ack.seq)
    ev = decode_event(msg.data, BatchEvent)
    assert ev == BatchAccepted(spec=spec, at=1.0)
    await nc.drain()


async def test_livekit_room_create_and_list(livekit_env: dict[str, str], unique: str) -> None:
    lk = api.LiveKitAPI(livekit_env["LIVEKIT_URL"].replace("ws", "http", 1),
                        livekit_env["LIVEKIT_API_KEY"], livekit_env["LIVEKIT_API_SECRET"])
    try:
        name = f"smoke-{unique}"
        room = await lk.room.create_room(api.CreateRoomRequest(name=name, empty_timeout=600, metadata='{"k":"क"}'))
        assert room.name == name
        listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[name]))
        assert [r.name for r in listed.rooms] == [name]
        assert listed.rooms[0].metadata == '{"k":"क"}'
        await lk.room.delete_room(api.DeleteRoomRequest(room=name))
    finally:
        await lk.aclose()
