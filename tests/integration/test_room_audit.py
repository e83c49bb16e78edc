"""The room audit end to end through the real path: livekit-server -> signed webhook ->
crosstalk's receiver (services/webhook) -> JetStream -> sink -> batch.json, joined with the
real allocator's grants. An agent joined to a conversation room by hand must be flagged."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from livekit import api, rtc
from support.harness import Procs, wait_for
from support.sink import running_sink

from shared import contracts, rooms, subjects
from shared.contracts import RoleReply, RoleRequest


def agent_token(room: str, identity: str, key: str, secret: str) -> str:
    return (api.AccessToken(key, secret).with_identity(identity).with_kind("agent")
            .with_grants(api.VideoGrants(room_join=True, room=room)).to_jwt())


async def ask_role(nc: Any, room: str, job_id: str, identity: str, prefer: str) -> RoleReply:
    req = contracts.encode(RoleRequest(room=room, job_id=job_id, identity=identity, prefer=prefer))  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while True:
        try:
            msg = await nc.request(subjects.ROLE_REQUEST, req, timeout=3)
            return contracts.decode(msg.data, RoleReply)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def audit_of(data_dir: Path, batch: str, conv: str) -> dict[str, Any] | None:
    path = data_dir / "batches" / batch / "batch.json"
    if not path.exists():
        return None
    return json.loads(path.read_bytes())["conversations"].get(conv)


async def test_an_agent_joined_by_hand_is_flagged_in_batch_json(
    nats_url: str, audited_livekit: Any, tmp_path: Path, unique: str
) -> None:
    key, secret, url = "devkey", "secret", audited_livekit.url  # the keys start_livekit configures
    livekit_env = {"LIVEKIT_URL": url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret}
    procs = Procs(tmp_path, nats_url, livekit_env)
    procs.allocator()
    batch = f"audit-{unique}"
    conv = rooms.conversation_id(batch, 0)
    room = rooms.room_name(conv, 1)
    data = tmp_path / "data"
    lk = api.LiveKitAPI(url.replace("ws", "http", 1), key, secret)
    nc = await nats.connect(nats_url)
    joined: list[rtc.Room] = []
    try:
        async with running_sink(nats_url, data, f"audit{unique}"):
            await lk.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=120))
            # the conversation's two agents: roles from the real allocator, then into the room
            for job, role in (("AJ_c" + unique, "customer"), ("AJ_s" + unique, "support")):
                identity = f"agent-{job}"
                reply = await ask_role(nc, room, job, identity, role)
                assert reply.granted and reply.role == role, reply
                r = rtc.Room()
                await r.connect(url, agent_token(room, identity, key, secret))
                joined.append(r)

            def two_agents_with_roles() -> bool:
                entry = audit_of(data, batch, conv)
                return bool(entry) and sorted((p["role"], p["kind"]) for p in entry["participants"]) == [
                    ("customer", "agent"), ("support", "agent")] and entry["violations"] == []

            await wait_for(two_agents_with_roles, 60, "both agents in the audit with their roles, no violation")
            # an extra AGENT participant joined by hand: no grant, third agent
            intruder = rtc.Room()
            await intruder.connect(url, agent_token(room, f"intruder-{unique}", key, secret))
            joined.append(intruder)

            def flagged() -> dict[str, Any] | None:
                entry = audit_of(data, batch, conv)
                kinds = {v["kind"] for v in entry["violations"]} if entry else set()
                return entry if {"no_grant", "third_agent"} <= kinds else None

            entry = await wait_for(flagged, 60, "the audit to flag the intruder")
            no_grant = [v for v in entry["violations"] if v["kind"] == "no_grant"]
            assert [v["identities"] for v in no_grant] == [[f"intruder-{unique}"]]
            assert all(v["room"] == room and v["attempt"] == 1 for v in entry["violations"])
            assert "two_of_one_role" not in {v["kind"] for v in entry["violations"]}
            intruder_p = next(p for p in entry["participants"] if p["identity"] == f"intruder-{unique}")
            assert intruder_p["kind"] == "agent" and intruder_p["role"] is None and intruder_p["joined_at"]

            # leaving and the room's end are recorded too
            for r in joined:
                await r.disconnect()
            await lk.room.delete_room(api.DeleteRoomRequest(room=room))

            def all_left() -> bool:
                entry = audit_of(data, batch, conv)
                return bool(entry) and all(p["left_at"] for p in entry["participants"]) and any(
                    r["finished_at"] for r in entry["rooms"])

            await wait_for(all_left, 60, "participant_left and room_finished in the audit")
    finally:
        for r in joined:
            await r.disconnect()
        await lk.aclose()
        await nc.drain()
        procs.stop_all()


def _signed(body: bytes, key: str, secret: str) -> str:
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    return api.AccessToken(key, secret).with_sha256(digest).to_jwt()


async def test_receiver_rejects_bad_signatures_and_dedupes_retries(
    nats_url: str, audited_livekit: Any, unique: str
) -> None:
    hook = audited_livekit.extra["webhook"]
    room = f"hooktest-{unique}-00000-a1"
    body = json.dumps({
        "event": "participant_joined", "id": f"EV_{unique}", "createdAt": str(int(time.time())),
        "room": {"name": room, "sid": "RM_x", "turnPassword": "never-copied"},
        "participant": {"identity": "someone", "sid": "PA_x", "kind": "AGENT", "joinedAtMs": "1700000000123"},
    }).encode()
    async with aiohttp.ClientSession() as http:
        async def post(data: bytes, auth: str | None) -> int:
            headers = {"Content-Type": "application/webhook+json", **({"Authorization": auth} if auth else {})}
            async with http.post(hook.url, data=data, headers=headers) as resp:
                return resp.status

        assert await post(body, None) == 401
        assert await post(body, _signed(body, "devkey", "wrong-secret")) == 401
        assert await post(body, _signed(body, "otherkey", "secret")) == 401
        assert await post(body.replace(b"someone", b"someone-else"), _signed(body, "devkey", "secret")) == 401
        assert await post(b"\xff\xfe", _signed(b"\xff\xfe", "devkey", "secret")) == 401
        good = _signed(body, "devkey", "secret")
        assert await post(body, good) == 200
        assert await post(body, good) == 200  # livekit-server's retry: same event id
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subjects.lk_room_event(room, "participant_joined"), ordered_consumer=True)
        first = await sub.next_msg(timeout=5)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=1)
        await sub.unsubscribe()
    finally:
        await nc.drain()
    ev = contracts.decode(first.data, contracts.RoomWebhook)
    assert (ev.id, ev.room, ev.identity, ev.kind, ev.joined_at) == (f"EV_{unique}", room, "someone", "agent", 1700000000.123)
    assert b"never-copied" not in first.data
    log = Path(hook.extra["log"]).read_text()
    assert "wrong-secret" not in log and good not in log
