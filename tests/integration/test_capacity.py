"""Admission by the workers' real capacity (issue 12), against real nats-server and livekit-server.

The fake agent workers announce their capacity with the real worker's code
(worker/lifecycle/capacity.py); what the tests assert about load comes from the workers' own
reports (their heartbeats and the job counts their entrypoints log), not from the
dispatcher's decisions.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import defaultdict

import aiohttp
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from support.harness import (
    Proc,
    Procs,
    agent_name,
    batch_events,
    dispatcher_started,
    wait_finished,
    wait_for,
)

from shared import capacity, contracts, subjects
from shared.contracts import (
    ConversationDispatched,
    ConversationSettled,
    DispatcherStatus,
    WorkerCapacity,
)

pytestmark = pytest.mark.timeout(300)


class Observed:
    """Every worker heartbeat and dispatcher status seen on the bus, with its arrival time."""

    def __init__(self) -> None:
        self.beats: list[tuple[float, WorkerCapacity]] = []
        self.status: list[tuple[float, DispatcherStatus]] = []

    async def start(self, nc: Client) -> None:
        async def beat(msg: Msg) -> None:
            self.beats.append((time.monotonic(), contracts.decode(msg.data, WorkerCapacity)))

        async def status(msg: Msg) -> None:
            self.status.append((time.monotonic(), contracts.decode(msg.data, DispatcherStatus)))

        await nc.subscribe(subjects.WORKER_CAPACITY_ALL, cb=beat)
        await nc.subscribe(subjects.DISPATCHER_STATUS, cb=status)

    def of(self, worker_id: str) -> list[WorkerCapacity]:
        return [hb for _, hb in self.beats if hb.worker_id == worker_id]


def peak_running(log: str) -> int:
    """The most jobs the fake agent ran at once, from its own entrypoints' count."""
    return max((int(m) for m in re.findall(r"jobs running=(\d+)", log)), default=0)


async def watch_and_allocate(procs: Procs, nc: Client) -> tuple[Observed, str]:
    """Start observing the bus and the allocator; a fresh agent name."""
    seen = Observed()
    await seen.start(nc)
    procs.allocator()
    return seen, agent_name()


async def start_dispatcher(procs: Procs, js: JetStreamContext, name: str) -> Proc:
    d = procs.dispatcher(CROSSTALK_AGENT_NAME=name, CROSSTALK_DISPATCH_RATE="20", CROSSTALK_JOIN_DEADLINE_S="30")
    await dispatcher_started(js)
    return d


async def request(nc: Client, body: dict[str, object]) -> None:
    msg = await nc.request(subjects.BATCH_START, contracts.encode(body), timeout=20)
    assert contracts.decode(msg.data, contracts.BatchReply).accepted


async def test_concurrency_above_capacity_waits_and_never_fails(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext]) -> None:
    nc, js = bus_conn
    seen, name = await watch_and_allocate(procs, nc)
    worker = procs.fake_agent(name, talk_s=1.5, max_jobs=4)  # 4 sessions: 2 conversations at once
    d = await start_dispatcher(procs, js, name)
    bid = f"cap-{uuid.uuid4().hex[:6]}"
    n = 10
    await request(nc, {"batch_id": bid, "conversations": n, "concurrency": n})

    async def queued_metric() -> float:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{d.env['CROSSTALK_METRICS_PORT']}/metrics") as resp:
            text = await resp.text()
        value = re.search(r"^crosstalk_dispatcher_queued (\S+)$", text, re.M)
        return float(value[1]) if value else -1.0

    peak_queued_metric = 0.0
    deadline = time.monotonic() + 240
    finished = None
    while finished is None and time.monotonic() < deadline:
        peak_queued_metric = max(peak_queued_metric, await queued_metric())
        try:
            finished = await wait_finished(js, bid, 1)
        except TimeoutError:
            pass
    assert finished is not None, "batch did not finish"
    assert (finished.status, finished.completed, finished.failed) == ("completed", n, 0)

    events = await batch_events(js, bid)
    settled = [e for e in events if isinstance(e, ConversationSettled)]
    assert all(e.outcome == "completed" for e in settled)
    assert not [e for e in settled if e.reason.split(":")[0] in ("join_timeout", "no_capacity")]
    assert len([e for e in events if isinstance(e, ConversationDispatched)]) == n  # one attempt each

    # The worker's own reports: never more than its 4 sessions, never more than 2 rooms at once.
    assert 0 < peak_running(worker.log()) <= 4
    mine = seen.of(worker.info["worker_id"])
    assert mine and all(hb.capacity == 4 and hb.active <= 4 for hb in mine)
    assert max(len(set(hb.rooms)) for hb in mine) <= 2
    # ...and the batch really waited for capacity: queued, in the gauge and in dispatcher.status.
    assert peak_queued_metric >= 1
    queued = [st.batches[bid].queued for _, st in seen.status if bid in st.batches]
    assert max(queued) >= 6  # 10 wanted, 2 admitted
    assert all(st.capacity <= 4 for _, st in seen.status)


async def test_a_killed_workers_slots_vanish_and_the_batch_completes_on_the_rest(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext]) -> None:
    nc, js = bus_conn
    seen, name = await watch_and_allocate(procs, nc)
    doomed = procs.fake_agent(name, talk_s=3.0, max_jobs=4)
    survivor = procs.fake_agent(name, talk_s=3.0, max_jobs=4)
    await start_dispatcher(procs, js, name)

    def announced() -> int | None:
        return seen.status[-1][1].capacity if seen.status else None

    await wait_for(lambda: announced() == 8, 20, "both workers announced (8 sessions)")
    bid = f"kill-{uuid.uuid4().hex[:6]}"
    n = 12
    await request(nc, {"batch_id": bid, "conversations": n, "concurrency": n})
    doomed_id = doomed.info["worker_id"]
    await wait_for(lambda: any(hb.active > 0 for hb in seen.of(doomed_id)), 60, "the doomed worker to run jobs")

    doomed.kill()  # SIGKILL: no goodbye heartbeat
    killed_at = time.monotonic()
    await wait_for(lambda: announced() == 4, capacity.EXPIRY_S + 5, "the dead worker's slots to vanish")
    vanished_at = time.monotonic()
    assert vanished_at - killed_at <= capacity.EXPIRY_S + 2 * capacity.HEARTBEAT_S + 1.0
    vanished_wall = time.time()

    finished = await wait_finished(js, bid, 240)
    assert (finished.status, finished.completed, finished.failed) == ("completed", n, 0)

    # Nothing was dispatched to the dead worker afterwards: every attempt dispatched after its slots
    # vanished ran on the survivor (its own heartbeats list the room) and needed no second try.
    events = await batch_events(js, bid)
    after = [e for e in events if isinstance(e, ConversationDispatched) and e.at > vanished_wall]
    assert after, "the batch should still have had conversations to dispatch after the kill"
    survivor_rooms = {room for hb in seen.of(survivor.info["worker_id"]) for room in hb.rooms}
    assert {e.room for e in after} <= survivor_rooms
    outcome: dict[tuple[str, int], str] = {}
    for e in events:
        if isinstance(e, ConversationSettled):
            outcome[(e.conversation_id, e.attempt)] = e.reason.split(":")[0]
    assert all(outcome[(e.conversation_id, e.attempt)] == "end_conversation" for e in after)
    # the doomed worker's own conversations were retried (agent_left), never failed, never no_capacity
    assert "no_capacity" not in outcome.values()
    # and after the slots vanished the dispatcher never counted more than the survivor's 4 sessions
    assert all(st.capacity <= 4 for t, st in seen.status if t > vanished_at)
    per_room: dict[str, int] = defaultdict(int)
    for hb in seen.of(survivor.info["worker_id"]):
        for room in set(hb.rooms):
            per_room[room] = max(per_room[room], hb.rooms.count(room))
    assert max(per_room.values()) <= 2
    assert 0 < peak_running(survivor.log()) <= 4
