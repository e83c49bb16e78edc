"""The dispatcher as a separate process against real nats-server and livekit-server.

Each test gets its own fresh nats-server (the dispatcher resumes every
unfinished batch it finds, so tests must not share a JetStream store) and the
session's livekit-server; agents come from tests/support/fake_agent.py, a real
livekit-agents worker that joins, reports and leaves.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import aiohttp
import pytest
from livekit import api
from nats.aio.client import Client
from nats.js import JetStreamContext
from support.harness import (
    Procs,
    agent_name,
    all_batch_events,
    batch_events,
    dispatcher_started,
    phantom_capacity,
    read_subject,
    wait_finished,
    wait_for,
)
from support.servers import find_binary

from services.dispatcher import core
from services.dispatcher.state import conversation_id, job_metadata, parse_room, replay
from shared import contracts, streams, subjects
from shared.contracts import (
    AgentJoined,
    BatchAccepted,
    BatchFinished,
    BatchRejected,
    BatchReply,
    ConversationDispatched,
    ConversationJoined,
    ConversationSettled,
    JobMetadata,
)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def lk(livekit_env: dict[str, str]) -> AsyncIterator[api.LiveKitAPI]:
    client = api.LiveKitAPI(livekit_env["LIVEKIT_URL"].replace("ws", "http", 1), livekit_env["LIVEKIT_API_KEY"],
                            livekit_env["LIVEKIT_API_SECRET"])
    yield client
    await client.aclose()


def start_agents(procs: Procs, name: str, *, talk_s: float, workers: int = 2) -> None:
    """The allocator and fake agent workers.

    Two workers, because livekit-rtc's FFI answers a lost connect handshake with a
    SIGTERM to the whole worker process under heavy load; the dispatcher then
    retries on the surviving worker, which is what it is for.
    """
    procs.allocator()
    for _ in range(workers):
        procs.fake_agent(name, talk_s=talk_s)


async def rooms_of(lk: api.LiveKitAPI, batch_id: str) -> list[api.Room]:
    res = await lk.room.list_rooms(api.ListRoomsRequest())
    return [r for r in res.rooms if r.name.startswith(f"{batch_id}-")]


async def delete_rooms(lk: api.LiveKitAPI, batch_id: str) -> None:
    for room in await rooms_of(lk, batch_id):
        await lk.room.delete_room(api.DeleteRoomRequest(room=room.name))


async def request(nc: Client, body: bytes) -> BatchReply:
    msg = await nc.request(subjects.BATCH_START, body, timeout=20)
    return contracts.decode(msg.data, BatchReply)


def settled_by_conversation(events: list[object]) -> dict[str, list[ConversationSettled]]:
    out: dict[str, list[ConversationSettled]] = defaultdict(list)
    for e in events:
        if isinstance(e, ConversationSettled):
            out[e.conversation_id].append(e)
    return out


# --------------------------------------------------------------------------- bad commands

BIG = b'{"batch_id":"big-one","pad":"' + b"x" * 70_000 + b'"}'
CORPUS: list[tuple[bytes, str]] = [
    (b"not json", "$"),
    (b"", "$"),
    (b"[]", "$"),
    (b"null", "$"),
    (b'"start"', "$"),
    (b"42", "$"),
    (b'{"conversations": 3', "$"),
    (BIG, "$"),
    (b'{"batch_id": "\xff\xfe"}', "$"),
    (b"\xc3\x28", "$"),
    (b'{"conversations": "5"}', "conversations"),
    (b'{"conversations": 5.5}', "conversations"),
    (b'{"conversations": true}', "conversations"),
    (b'{"conversations": null}', "conversations"),
    (b'{"conversations": 0}', "conversations"),
    (b'{"conversations": -3}', "conversations"),
    (b'{"conversations": 5001}', "conversations"),
    (b'{"conversations": 99999999999999999999999999}', "conversations"),
    (b'{"batch_id": "named-but-bad", "conversations": -1}', "conversations"),
    (b'{"concurrency": 0}', "concurrency"),
    (b'{"concurrency": -1}', "concurrency"),
    (b'{"concurrency": 100000}', "concurrency"),
    (b'{"concurrency": "all"}', "concurrency"),
    (b'{"scenario": "no-such-scenario"}', "scenario"),
    (b'{"scenario": "../../etc/passwd"}', "scenario"),
    (b'{"scenario": 7}', "scenario"),
    (b'{"batch_id": "../escape"}', "batch_id"),
    (b'{"batch_id": "a.b"}', "batch_id"),
    (b'{"batch_id": "a*"}', "batch_id"),
    (b'{"batch_id": ">"}', "batch_id"),
    (b'{"batch_id": "a.>"}', "batch_id"),
    (b'{"batch_id": "has space"}', "batch_id"),
    (b'{"batch_id": "UPPER"}', "batch_id"),
    (b'{"batch_id": ""}', "batch_id"),
    (b'{"batch_id": "' + b"x" * 65 + b'"}', "batch_id"),
    (b'{"batch_id": 12}', "batch_id"),
    (b'{"batch_id": "a/b"}', "batch_id"),
    (b'{"batch_id": "nul\\u0000"}', "batch_id"),
    (b'{"max_turns": 0}', "max_turns"),
    (b'{"max_turns": 1000}', "max_turns"),
    (b'{"mode": "video"}', "mode"),
    (b'{"mode": "voice", "language": "fr"}', "language"),  # no script and no voice in it
    (b'{"language": "english!"}', "language"),
    (b'{"language": "../x"}', "language"),
    (b'{"language": "hi"}', "language"),  # the default scenario's offline script is English
    (b'{"conversation": 200}', "conversation"),  # a typo is refused, not run as the default single conversation
    (b'{"target_agent": "my agent"}', "target_agent"),  # the user's agent name must be a token
    (b'{"target_agent": "acme", "target_metadata": 5}', "target_metadata"),
]


async def test_bad_commands_are_rejected_naming_the_field_and_create_nothing(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI) -> None:
    assert len(CORPUS) >= 30
    nc, js = bus_conn
    d = procs.dispatcher(CROSSTALK_AGENT_NAME=agent_name(), CROSSTALK_MAX_CONVERSATIONS="5000",
                         CROSSTALK_MAX_CONCURRENCY="50")
    metrics_port = d.env["CROSSTALK_METRICS_PORT"]
    await dispatcher_started(js)
    rooms_before = {r.name for r in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms}

    for body, field in CORPUS:
        reply = await request(nc, body)
        assert not reply.accepted, body[:80]
        assert reply.field == field, (body[:80], reply)
        assert reply.reason, body[:80]
        assert not reply.duplicate
    assert reply.reason
    # The same corpus as plain core publishes (no reply subject) is rejected too, through the stream.
    for body, _ in CORPUS:
        await nc.publish(subjects.BATCH_START, body)
    await nc.flush()

    async def all_rejected() -> list[BatchRejected] | None:
        msgs = await read_subject(js, streams.BATCH_EVENTS.name, subjects.BATCH_REJECTED)
        events = [contracts.decode(m.data, BatchRejected) for m in msgs]
        return events if len(events) >= 2 * len(CORPUS) else None

    rejected = await wait_for(all_rejected, 60, "every bad command to be rejected")
    assert len(rejected) == 2 * len(CORPUS)
    assert [e.field for e in rejected] == [f for _, f in CORPUS] * 2
    named = [e for e in rejected if e.batch_id is not None]
    assert {e.batch_id for e in named} == {"named-but-bad"}  # only a valid id is ever echoed

    # Nothing else changed: no batch event, no room.
    assert await all_batch_events(js) == []
    rooms_after = {r.name for r in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms}
    assert not {r for r in rooms_after - rooms_before if parse_room(r)}
    assert d.alive()

    # ...and the dispatcher keeps serving: a good command is accepted.
    good = await request(nc, b'{"batch_id": "after-the-storm", "conversations": 1}')
    assert good.accepted and good.batch_id == "after-the-storm" and not good.duplicate
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        text = await resp.text()
    assert f'crosstalk_batch_commands_total{{outcome="rejected"}} {2 * len(CORPUS)}.0' in text
    d.stop()
    await delete_rooms(lk, "after-the-storm")


# --------------------------------------------------------------------------- durable commands, real agents


async def test_batch_published_while_dispatcher_is_down_runs_when_it_starts(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI, fresh_nats: str) -> None:
    nc, js = bus_conn
    name = agent_name()
    # The dispatcher has run before (streams and its consumer exist), and is now stopped.
    first = procs.dispatcher(CROSSTALK_AGENT_NAME=name)
    await dispatcher_started(js)
    first.stop()
    assert first.popen.returncode == 0

    bid = f"down-{uuid.uuid4().hex[:6]}"
    cli_bid = f"cli-{uuid.uuid4().hex[:6]}"
    await nc.publish(subjects.BATCH_START, contracts.encode({"batch_id": bid, "conversations": 3, "concurrency": 2}))
    await nc.flush()
    cli = await asyncio.create_subprocess_exec(
        find_binary("nats"), "--server", fresh_nats, "pub", subjects.BATCH_START,
        f'{{"batch_id": "{cli_bid}", "conversations": 2, "scenario": "hi-account-help"}}',
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(cli.communicate(), 30)
    assert cli.returncode == 0, out

    start_agents(procs, name, talk_s=0.5)
    procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_DISPATCH_RATE="5", CROSSTALK_JOIN_DEADLINE_S="15")

    for batch_id, n in ((bid, 3), (cli_bid, 2)):
        finished = await wait_finished(js, batch_id, 120)
        assert (finished.status, finished.requested, finished.completed, finished.failed) == ("completed", n, n, 0)
        events = await batch_events(js, batch_id)
        accepted = [e for e in events if isinstance(e, BatchAccepted)]
        assert len(accepted) == 1
        joined = {e.conversation_id for e in events if isinstance(e, ConversationJoined)}
        ids = {conversation_id(batch_id, i) for i in range(n)}
        assert joined == ids
        settled = settled_by_conversation(events)
        assert set(settled) == ids
        assert all(s[-1].outcome == "completed" and s[-1].reason.startswith("end_conversation") for s in settled.values())
    cli_spec = next(e for e in await batch_events(js, cli_bid) if isinstance(e, BatchAccepted)).spec
    assert (cli_spec.scenario, cli_spec.language) == ("hi-account-help", "hi")
    # Every room is deleted once its conversation settled.
    await wait_for(lambda: _no_rooms(lk, bid, cli_bid), 30, "rooms to be deleted")


async def _no_rooms(lk: api.LiveKitAPI, *batch_ids: str) -> bool:
    for b in batch_ids:
        if await rooms_of(lk, b):
            return False
    return True


async def test_rooms_and_dispatches_appear_in_livekit(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI) -> None:
    nc, js = bus_conn
    name = agent_name()  # no worker has this name: the rooms wait for agents that never come
    procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_JOIN_DEADLINE_S="120", CROSSTALK_ROOM_EMPTY_TIMEOUT_S="700")
    await dispatcher_started(js)
    bid = f"lk-{uuid.uuid4().hex[:6]}"
    async with phantom_capacity(nc, name):  # capacity announced: admitted, though no worker takes the jobs
        await _rooms_and_dispatches(nc, js, lk, name, bid)


async def _rooms_and_dispatches(nc: Client, js: JetStreamContext, lk: api.LiveKitAPI, name: str, bid: str) -> None:
    reply = await request(nc, contracts.encode({"batch_id": bid, "conversations": 3, "concurrency": 2,
                                               "scenario": "hi-account-help", "language": "hi", "max_turns": 4}))
    assert reply.accepted and reply.batch_id == bid
    try:
        rooms = await wait_for(lambda: _rooms_with_dispatches(lk, bid, 2), 30, "two rooms with their dispatches")
        # concurrency 2: the third conversation waits for a slot
        assert sorted(r.name for r in rooms) == [f"{bid}-00000-a1", f"{bid}-00001-a1"]
        for room in rooms:
            assert room.empty_timeout == 700
            meta = contracts.decode(room.metadata.encode(), JobMetadata)
            assert (meta.batch_id, meta.conversation_id, meta.attempt) == (bid, room.name[:-3], 1)
            assert (meta.scenario, meta.language, meta.mode, meta.max_turns) == ("hi-account-help", "hi", "text", 4)
            # ours only: the room is created with them, so livekit-server adds no automatic one (agent_name "")
            dispatches = await lk.agent_dispatch.list_dispatch(room.name)
            assert len(dispatches) == 2
            for disp in dispatches:
                assert disp.agent_name == name
                assert contracts.decode(disp.metadata.encode(), JobMetadata) == meta
        events = await batch_events(js, bid)
        assert [type(e).__name__ for e in events] == ["BatchAccepted", "ConversationDispatched",
                                                      "ConversationDispatched"]
    finally:
        await delete_rooms(lk, bid)


async def _rooms_with_dispatches(lk: api.LiveKitAPI, bid: str, n: int) -> list[api.Room] | None:
    rooms = await rooms_of(lk, bid)
    if len(rooms) < n:
        return None
    for room in rooms:
        if len([d for d in await lk.agent_dispatch.list_dispatch(room.name) if d.agent_name]) < 2:
            return None
    return rooms


async def test_a_repeated_batch_id_is_idempotent(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI) -> None:
    nc, js = bus_conn
    name = agent_name()
    procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_JOIN_DEADLINE_S="120")
    await dispatcher_started(js)
    bid = f"dup-{uuid.uuid4().hex[:6]}"
    body = contracts.encode({"batch_id": bid, "conversations": 1})
    async with phantom_capacity(nc, name):
        await _repeated(nc, js, lk, bid, body)


async def _repeated(nc: Client, js: JetStreamContext, lk: api.LiveKitAPI, bid: str, body: bytes) -> None:
    try:
        first = await request(nc, body)
        again = await request(nc, body)
        other = await request(nc, contracts.encode({"batch_id": bid, "conversations": 7, "max_turns": 3}))
        await nc.publish(subjects.BATCH_START, body)  # and once more as a plain publish
        await nc.flush()
        assert first == BatchReply(accepted=True, batch_id=bid)
        for r in (again, other):
            assert r.accepted and r.duplicate and r.batch_id == bid
        await asyncio.sleep(1.0)
        events = await batch_events(js, bid)
        accepted = [e for e in events if isinstance(e, BatchAccepted)]
        assert len(accepted) == 1 and accepted[0].spec.conversations == 1 and accepted[0].spec.max_turns == 8
        dispatched = [e for e in events if isinstance(e, ConversationDispatched)]
        assert [(e.conversation_id, e.attempt) for e in dispatched] == [(f"{bid}-00000", 1)]
    finally:
        await delete_rooms(lk, bid)


# --------------------------------------------------------------------------- failures and restarts


async def test_join_timeout_is_retried_then_failed_with_a_reason(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI) -> None:
    nc, js = bus_conn
    name = agent_name()
    procs.fake_agent(name, mode="stall")  # livekit-server places every job on it; none ever joins
    # livekit-server records the job on its dispatch a few seconds after placing it (~5 s measured), so
    # the deadline, where placement is checked, is longer than that
    procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_JOIN_DEADLINE_S="15", CROSSTALK_MAX_ATTEMPTS="2")
    await dispatcher_started(js)
    bid = f"jt-{uuid.uuid4().hex[:6]}"
    assert (await request(nc, contracts.encode({"batch_id": bid, "conversations": 2}))).accepted
    finished = await wait_finished(js, bid, 60)
    assert (finished.status, finished.completed, finished.failed) == ("failed", 0, 2)
    events = await batch_events(js, bid)
    settled = settled_by_conversation(events)
    assert set(settled) == {f"{bid}-00000", f"{bid}-00001"}
    for conv_settled in settled.values():
        assert [(s.attempt, s.outcome, s.reason, s.retry) for s in conv_settled] == [
            (1, "failed", "join_timeout", True), (2, "failed", "join_timeout", False)]
    rooms = [(e.conversation_id, e.room) for e in events if isinstance(e, ConversationDispatched)]
    assert sorted(r for _, r in rooms) == sorted(f"{bid}-{i:05d}-a{a}" for i in range(2) for a in (1, 2))
    assert isinstance(events[-1], BatchFinished)
    await wait_for(lambda: _no_rooms(lk, bid), 30, "rooms of failed attempts to be deleted")


async def test_a_dispatch_no_worker_takes_is_no_capacity_and_uses_no_attempt(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI) -> None:
    """Capacity announced but nothing registered under the agent name: livekit-server places the
    dispatches nowhere (list_dispatch shows no job), which is ours, not the conversation's."""
    nc, js = bus_conn
    name = agent_name()
    procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_JOIN_DEADLINE_S="1", CROSSTALK_MAX_ATTEMPTS="1")
    await dispatcher_started(js)
    bid = f"nocap-{uuid.uuid4().hex[:6]}"
    async with phantom_capacity(nc, name):
        assert (await request(nc, contracts.encode({"batch_id": bid, "conversations": 1}))).accepted
        finished = await wait_finished(js, bid, 90)
    assert (finished.status, finished.failed) == ("failed", 1)
    settled = settled_by_conversation(await batch_events(js, bid))[f"{bid}-00000"]
    # max_attempts 1, yet re-queued core.MAX_NO_CAPACITY_REQUEUES times: no attempt was used up
    assert [s.reason.split(":")[0] for s in settled] == ["no_capacity"] * (core.MAX_NO_CAPACITY_REQUEUES + 1)
    assert [s.retry for s in settled] == [True] * core.MAX_NO_CAPACITY_REQUEUES + [False]
    await wait_for(lambda: _no_rooms(lk, bid), 30, "rooms to be deleted")


async def test_an_agent_that_leaves_fails_the_conversation_with_agent_left(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext]) -> None:
    nc, js = bus_conn
    name = agent_name()
    procs.allocator()
    procs.fake_agent(name, mode="leave")
    procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_MAX_ATTEMPTS="1")
    await dispatcher_started(js)
    bid = f"left-{uuid.uuid4().hex[:6]}"
    assert (await request(nc, contracts.encode({"batch_id": bid, "conversations": 1}))).accepted
    finished = await wait_finished(js, bid, 90)
    assert (finished.status, finished.failed) == ("failed", 1)
    settled = settled_by_conversation(await batch_events(js, bid))[f"{bid}-00000"]
    assert len(settled) == 1 and settled[0].reason.startswith("agent_left") and not settled[0].retry


async def test_sigkill_and_restart_mid_batch_neither_loses_nor_duplicates_conversations(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI) -> None:
    nc, js = bus_conn
    name = agent_name()
    start_agents(procs, name, talk_s=1.5)
    env = {"CROSSTALK_AGENT_NAME": name, "CROSSTALK_DISPATCH_RATE": "4", "CROSSTALK_JOIN_DEADLINE_S": "15"}
    dispatcher = procs.dispatcher(**env)
    await dispatcher_started(js)
    bid = f"kill-{uuid.uuid4().hex[:6]}"
    n, concurrency = 10, 3
    assert (await request(nc, contracts.encode({"batch_id": bid, "conversations": n,
                                                "concurrency": concurrency}))).accepted

    for settled_before_kill in (2, 5):
        async def progressed(target: int = settled_before_kill) -> bool:
            events = await batch_events(js, bid)
            return sum(isinstance(e, ConversationSettled) for e in events) >= target

        await wait_for(progressed, 90, f"{settled_before_kill} settled conversations")
        dispatcher.kill()
        await asyncio.sleep(1.0)
        dispatcher = procs.dispatcher(**env)

    finished = await wait_finished(js, bid, 150)
    assert (finished.status, finished.requested, finished.completed, finished.failed) == ("completed", n, n, 0)

    events = await batch_events(js, bid)
    ids = [conversation_id(bid, i) for i in range(n)]
    # Replaying the log gives the same answer as the live dispatcher.
    state = replay((e, i + 1) for i, e in enumerate(events))[bid]
    assert (state.status, state.completed, state.failed) == ("completed", n, 0)
    # Every conversation dispatched, each attempt once, in order, never two attempts in flight at once;
    # never more than `concurrency` conversations in flight.
    in_flight: dict[str, int] = {}
    attempts: dict[str, list[int]] = defaultdict(list)
    peak = 0
    for e in events:
        if isinstance(e, ConversationDispatched):
            assert e.conversation_id not in in_flight
            in_flight[e.conversation_id] = e.attempt
            attempts[e.conversation_id].append(e.attempt)
            peak = max(peak, len(in_flight))
        elif isinstance(e, ConversationSettled):
            assert in_flight.pop(e.conversation_id) == e.attempt
    assert sorted(attempts) == ids
    assert all(a == list(range(1, len(a) + 1)) for a in attempts.values())
    assert peak <= concurrency
    settled = settled_by_conversation(events)
    assert all([s.retry for s in v] == [True] * (len(v) - 1) + [False] for v in settled.values())
    assert Counter(s[-1].outcome for s in settled.values()) == {"completed": n}
    # No attempt got more than its two agents (a resumed attempt is not dispatched again).
    joins = [contracts.decode_event(m.data, AgentJoined)
             for m in await read_subject(js, streams.CONVERSATIONS.name, subjects.conv_batch_filter(bid))
             if m.subject.endswith(".joined")]
    per_attempt = Counter((j.conversation_id, j.attempt) for j in joins)
    assert max(per_attempt.values()) == 2
    assert {c for c, _ in per_attempt} == set(ids)
    await wait_for(lambda: _no_rooms(lk, bid), 30, "rooms to be deleted")


async def test_a_restart_completes_a_half_opened_attempt_and_deletes_rooms_left_behind(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], lk: api.LiveKitAPI) -> None:
    """The log a dispatcher killed mid-way leaves: conversation 0 dispatched (its room has one of its two
    dispatches), conversation 1 settled (its room not yet deleted)."""
    nc, js = bus_conn
    name = agent_name()
    bid = f"half-{uuid.uuid4().hex[:6]}"
    spec = contracts.BatchSpec(batch_id=bid, conversations=2, concurrency=2, scenario="en-account-help",
                               language="en", max_turns=8, mode="text")
    now = time.time()
    c0, c1 = conversation_id(bid, 0), conversation_id(bid, 1)
    log = [
        BatchAccepted(spec=spec, at=now - 5),
        ConversationDispatched(batch_id=bid, conversation_id=c0, attempt=1, room=f"{c0}-a1", at=now - 4),
        ConversationDispatched(batch_id=bid, conversation_id=c1, attempt=1, room=f"{c1}-a1", at=now - 4),
        ConversationSettled(batch_id=bid, conversation_id=c1, attempt=1, outcome="completed",
                            reason="end_conversation: support", retry=False, turns=4, at=now - 1),
    ]
    for ev in log:
        await js.publish(subjects.batch_events(bid), contracts.encode(ev))
    meta = contracts.encode(job_metadata(spec, c0, 1)).decode()
    try:
        for room in (f"{c0}-a1", f"{c1}-a1"):
            await lk.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=600, metadata=meta))
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=name, room=f"{c0}-a1",
                                                                               metadata=meta))

        procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_JOIN_DEADLINE_S="120")

        async def repaired() -> bool:
            names = {r.name for r in await rooms_of(lk, bid)}
            if names != {f"{c0}-a1"}:
                return False
            ours = [d for d in await lk.agent_dispatch.list_dispatch(f"{c0}-a1") if d.agent_name == name]
            return len(ours) == 2

        await wait_for(repaired, 30, "the half-opened room to get its second dispatch and the stale room to go")
        await asyncio.sleep(1.0)
        events = await batch_events(js, bid)
        assert events == log  # resuming wrote nothing: no second acceptance, no new attempt
    finally:
        await delete_rooms(lk, bid)


async def test_a_log_it_cannot_fold_stops_the_dispatcher_naming_the_event(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext]) -> None:
    """An undecodable batch event is never skipped: the fold would silently diverge from the log."""
    _, js = bus_conn
    bid = f"bad-log-{uuid.uuid4().hex[:6]}"
    ack = await js.publish(subjects.batch_events(bid), b'{"type": "batch_accepted", "spec": "not a spec"}')
    proc = procs.dispatcher()
    code = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.popen.wait(60))
    assert code == 3
    log = proc.log()
    assert f"BATCH_EVENTS sequence {ack.seq} on {subjects.batch_events(bid)} cannot be decoded" in log
    assert "cannot fold the batch event log" in log
