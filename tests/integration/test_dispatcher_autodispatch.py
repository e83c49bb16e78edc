"""Rooms the dispatcher opens are closed to livekit-server's automatic dispatch (the session's real server).

livekit-server v1.13.5 gives a room created without ``CreateRoomRequest.agents`` one dispatch with an
empty agent name, which every worker registered without an ``agent_name`` (LiveKit's quickstart
default) takes: it would join every conversation as a third agent. The dispatcher puts its own
dispatches in ``agents`` (services/dispatcher/rooms.py), and a room with a non-empty ``agents`` gets
those and no default one. A worker registered with agent name "" (tests/support/unnamed_agent.py)
shows both sides: a job request for a plain room (the control), none for ours.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from livekit import api
from prometheus_client import CollectorRegistry
from support.harness import Procs, wait_for

from services.dispatcher.rooms import Rooms
from shared import config
from shared.contracts import JobMetadata
from shared.metrics import DispatcherMetrics

pytestmark = pytest.mark.timeout(120)


def meta(room: str, **more: str) -> JobMetadata:
    return JobMetadata(batch_id=room.rsplit("-", 2)[0], conversation_id=room[:-3], attempt=1,
                       scenario="en-account-help", language="en", mode="text", max_turns=4, **more)


async def test_an_unnamed_agent_gets_jobs_in_plain_rooms_and_none_in_ours(
        tmp_path: Path, livekit_env: dict[str, str]) -> None:
    procs = Procs(tmp_path, "nats://127.0.0.1:1", livekit_env)  # neither side here uses NATS
    unnamed = procs.start("unnamed-agent", "support.unnamed_agent", {}, ready_line=b"READY ")
    s = config.load({**livekit_env, "CROSSTALK_AGENT_NAME": f"nobody-{uuid.uuid4().hex[:6]}"})
    rooms = Rooms(s, DispatcherMetrics(CollectorRegistry()))
    lk = api.LiveKitAPI(livekit_env["LIVEKIT_URL"].replace("ws", "http", 1), livekit_env["LIVEKIT_API_KEY"],
                        livekit_env["LIVEKIT_API_SECRET"])
    tag = uuid.uuid4().hex[:6]
    ours = f"auto-{tag}-00000-a1"  # two of crosstalk's dispatches
    target = f"auto-{tag}-00001-a1"  # a target batch's room: one (the customer)
    plain = f"plain-{tag}"
    try:
        await rooms.open(ours, meta(ours))
        await rooms.open(target, meta(target, target_agent="their-agent"))
        await lk.room.create_room(api.CreateRoomRequest(name=plain, empty_timeout=60))

        def jobs() -> list[str]:
            return [line.split(" ", 1)[1] for line in unnamed.output().decode().splitlines()
                    if line.startswith("JOB ")]

        await wait_for(lambda: plain in jobs(), 30, "the unnamed agent's job request for the plain room")
        await asyncio.sleep(2.0)  # ours were created first: their requests, if any, would be in by now
        assert ours not in jobs() and target not in jobs(), jobs()
        assert [d.agent_name for d in await lk.agent_dispatch.list_dispatch(plain)] == [""]
        assert [d.agent_name for d in await lk.agent_dispatch.list_dispatch(ours)] == [s.agent_name] * 2
        assert [d.agent_name for d in await lk.agent_dispatch.list_dispatch(target)] == [s.agent_name]
    finally:
        for room in (ours, target, plain):
            await rooms.delete(room)
        await rooms.aclose()
        await lk.aclose()
        procs.stop_all()
        print(procs.logs())
