"""The dispatcher's LiveKit calls against the session's real livekit-server.

The one thing faked here is a lost reply: the client-side wrapper lets a real
``create_dispatch`` land on livekit-server and then raises a timeout, as a dropped
response would. The dispatcher must not answer that with a second dispatch.
"""

from __future__ import annotations

import uuid
from typing import Any

from livekit import api
from prometheus_client import CollectorRegistry

from services.dispatcher.rooms import Rooms
from shared import config
from shared.contracts import JobMetadata
from shared.metrics import DispatcherMetrics


def settings(livekit_env: dict[str, str]) -> config.Settings:
    return config.load({**livekit_env, "CROSSTALK_AGENT_NAME": f"nobody-{uuid.uuid4().hex[:6]}"})


async def test_a_create_dispatch_whose_reply_was_lost_is_not_repeated(livekit_env: dict[str, str]) -> None:
    """A fresh room gets its two dispatches with the room itself (CreateRoomRequest.agents: no
    create_dispatch at all, and no automatic dispatch); a resumed attempt whose room lost one
    re-creates it once, even when the reply to that create_dispatch is lost."""
    s = settings(livekit_env)
    rooms = Rooms(s, DispatcherMetrics(CollectorRegistry()))
    real = rooms._api.agent_dispatch.create_dispatch
    calls = 0

    async def landed_then_lost(req: api.CreateAgentDispatchRequest) -> Any:
        nonlocal calls
        calls += 1
        result = await real(req)
        if calls == 1:
            raise TimeoutError  # the dispatch exists; only its reply was lost
        return result

    rooms._api.agent_dispatch.create_dispatch = landed_then_lost  # type: ignore[method-assign]
    room = f"rooms-{uuid.uuid4().hex[:8]}-00000-a1"
    meta = JobMetadata(batch_id="rooms-test", conversation_id=room[:-3], attempt=1, scenario="en-account-help",
                       language="en", mode="text", max_turns=4)
    try:
        await rooms.open(room, meta)
        listed = await rooms._api.agent_dispatch.list_dispatch(room)
        assert calls == 0 and [d.agent_name for d in listed] == [s.agent_name] * 2  # ours, and only ours
        for d in listed:  # as a crash after create_room and before its dispatches would have left it
            await rooms._api.agent_dispatch.delete_dispatch(d.id, room)
        await rooms.ensure(room, meta)
        ours = [d for d in await rooms._api.agent_dispatch.list_dispatch(room) if d.agent_name == s.agent_name]
        assert calls == 2  # the first landed, the list showed one missing, one more was created
        assert len(ours) == 2
        await rooms.ensure(room, meta)  # a resumed attempt creates nothing more
        assert len([d for d in await rooms._api.agent_dispatch.list_dispatch(room)
                    if d.agent_name == s.agent_name]) == 2
    finally:
        await rooms.delete(room)
        await rooms.aclose()
