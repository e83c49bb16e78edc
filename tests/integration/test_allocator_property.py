"""Property test: any ordering of requests, duplicates, releases and instance restarts keeps the invariant.

Three in-process allocator instances, each on its own connection, serve a nats-server of
this module's own (so no other instance answers in the queue group). Hypothesis generates
waves of concurrent operations over a few rooms; between or during waves an instance is
crashed (in-flight requests abandoned, connection closed) and started again. Afterwards
the room's whole event log is folded and checked, the replies are checked against it, and
a quiet final pass checks that every holder gets its role again and that free roles go
to the jobs still waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from prometheus_client import CollectorRegistry
from support.servers import Server, start_nats

from services.allocator import core
from services.allocator.main import Allocator
from shared import bus, contracts, subjects
from shared.contracts import (
    ROLES,
    LeaseEvent,
    ReleaseReply,
    Role,
    RoleRelease,
    RoleReply,
    RoleRequest,
)
from shared.metrics import AllocatorMetrics

INSTANCES = 3
LEASE_S = 30.0  # far longer than an example: nothing expires here (expiry: test_allocator.py)
ROLE_LOG_CAPACITY = 16  # streams.ROLES max_msgs_per_subject
MAX_WRITES_PER_ROOM = 8  # leaves room in the log for retried writes after a crash


@dataclass
class Cluster:
    url: str
    instances: list[tuple[Client, Allocator]] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    async def start_instance(self) -> tuple[Client, Allocator]:
        nc = await nats.connect(self.url)
        js = await bus.jetstream(nc)
        allocator = Allocator(nc, js, lease_s=LEASE_S, metrics=AllocatorMetrics(CollectorRegistry()))
        await allocator.start()
        return nc, allocator

    async def crash_and_restart(self, i: int) -> None:
        nc, allocator = self.instances[i]
        await allocator.stop(grace_s=0)  # abandon whatever it was doing, replies included
        await nc.close()
        self.instances[i] = await self.start_instance()


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_nats(tmp_path_factory.mktemp("alloc-prop") / "nats")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
async def cluster(own_nats: Server) -> AsyncIterator[Cluster]:
    c = Cluster(own_nats.url)
    for _ in range(INSTANCES):
        c.instances.append(await c.start_instance())
    c.clients = [await nats.connect(own_nats.url) for _ in range(3)]
    yield c
    for nc, allocator in c.instances:
        await allocator.stop()
        await nc.drain()
    for nc in c.clients:
        await nc.drain()


async def ask(nc: Client, request: RoleRequest) -> RoleReply:
    for _ in range(20):
        try:
            msg = await nc.request(subjects.ROLE_REQUEST, contracts.encode(request), timeout=0.5)
        except (NatsTimeoutError, NoRespondersError):
            continue  # the instance that had it crashed: ask again, as a worker does
        return contracts.decode(msg.data, RoleReply)
    raise AssertionError(f"no reply to {request}")


async def release(nc: Client, room: str, job_id: str) -> ReleaseReply:
    body = contracts.encode(RoleRelease(room=room, job_id=job_id))
    for _ in range(20):
        try:
            msg = await nc.request(subjects.ROLE_RELEASE, body, timeout=0.5)
        except (NatsTimeoutError, NoRespondersError):
            continue
        return contracts.decode(msg.data, ReleaseReply)
    raise AssertionError(f"no reply to release {room}/{job_id}")


async def room_log(nc: Client, room: str) -> list[LeaseEvent]:
    """Both role logs of a room, merged in stream order."""
    events: list[LeaseEvent] = await bus.replay(nc.jetstream(), subjects.role_room(room), LeaseEvent)
    for role in ROLES:
        n = sum(1 for e in events if e.role == role)
        assert n < ROLE_LOG_CAPACITY, f"scenario wrote {n} events to {room}/{role}: log truncated, shrink it"
    return events


def fold_checked(events: list[LeaseEvent]) -> dict[Role, str | None]:
    """Fold a room's log, checking every step; return the final holder of each role."""
    holder: dict[Role, str | None] = {"customer": None, "support": None}
    for e in events:
        other: Role = "support" if e.role == "customer" else "customer"
        if e.kind == "granted":
            assert holder[e.role] is None, f"{e.role} granted to {e.job_id} while {holder[e.role]} holds it"
            assert holder[other] != e.job_id, f"{e.job_id} granted {e.role} while holding {other}"
            holder[e.role] = e.job_id
        else:
            assert holder[e.role] == e.job_id, f"{e.kind} of {e.role} by {e.job_id}, holder {holder[e.role]}"
            if e.kind == "released":
                holder[e.role] = None
    return holder


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Op:
    kind: str  # "request" | "release"
    room: int
    job: int
    prefer: Role | None = None
    duplicate: bool = False
    delay_ms: int = 0


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[tuple[list[Op], tuple[int, bool] | None]]]:
    rooms = draw(st.integers(1, 3))
    jobs = draw(st.integers(2, 5))
    released: set[tuple[int, int]] = set()
    writes = dict.fromkeys(range(rooms), 0)
    waves = []
    for _ in range(draw(st.integers(1, 4))):
        ops = []
        acting: set[tuple[int, int]] = set()
        for _ in range(draw(st.integers(1, 6))):
            room, job = draw(st.integers(0, rooms - 1)), draw(st.integers(0, jobs - 1))
            if (room, job) in released or (room, job) in acting:
                continue  # a released job is done; one op per job per wave
            kind = draw(st.sampled_from(["request", "request", "request", "release"]))
            duplicate = kind == "request" and draw(st.booleans())
            cost = 2 if duplicate else 1
            if writes[room] + cost > MAX_WRITES_PER_ROOM:
                continue
            writes[room] += cost
            acting.add((room, job))
            if kind == "release":
                released.add((room, job))
            ops.append(Op(kind, room, job, draw(st.sampled_from([None, "customer", "support"])), duplicate,
                          draw(st.integers(0, 5))))
        ops = draw(st.permutations(ops))
        restart = draw(st.none() | st.tuples(st.integers(0, INSTANCES - 1), st.booleans()))
        waves.append((ops, restart))
    return jobs, waves


counter = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(scenario=scenarios())
async def test_any_interleaving_keeps_one_customer_one_support(
    cluster: Cluster, scenario: tuple[int, list[tuple[list[Op], tuple[int, bool] | None]]]
) -> None:
    jobs, waves = scenario
    prefix = f"p{uuid.uuid4().hex[:6]}{next(counter)}"
    room_of = {r: f"{prefix}-{r}" for r in range(3)}

    def job_id(room: int, job: int) -> str:
        return f"AJ_{room}_{job}"

    replies: dict[tuple[int, int], list[RoleReply]] = {}
    released: set[tuple[int, int]] = set()
    n = 0

    async def run(op: Op) -> None:
        nonlocal n
        await asyncio.sleep(op.delay_ms / 1000)
        n += 1
        if op.kind == "release":
            await release(cluster.clients[n % 3], room_of[op.room], job_id(op.room, op.job))
            released.add((op.room, op.job))
            return
        req = RoleRequest(room=room_of[op.room], job_id=job_id(op.room, op.job), identity=f"agent {op.job}",
                          prefer=op.prefer)
        sends = [ask(cluster.clients[(n + k) % 3], req) for k in range(2 if op.duplicate else 1)]
        replies.setdefault((op.room, op.job), []).extend(await asyncio.gather(*sends))

    for ops, restart in waves:
        work = [run(op) for op in ops]
        if restart is not None:
            idx, during = restart
            if during:
                work.append(cluster.crash_and_restart(idx))
            else:
                await cluster.crash_and_restart(idx)
        await asyncio.gather(*work)

    nc = cluster.clients[0]
    used_rooms = {r for ops, _ in waves for r in (op.room for op in ops)}
    for r in used_rooms:
        events = await room_log(nc, room_of[r])
        holder = fold_checked(events)
        granted_in_log = {(e.job_id, e.role) for e in events if e.kind == "granted"}
        for (room, job), answers in replies.items():
            if room != r:
                continue
            roles = {a.role for a in answers if a.granted}
            assert len(roles) <= 1, f"job {job} in room {r} was told {roles}"  # same answer every time
            leases = {a.lease for a in answers if a.granted}
            assert len(leases) <= 1 and None not in leases, (job, answers)  # ... with the same token
            for role in roles:
                assert (job_id(room, job), role) in granted_in_log
            assert all(a.reason == core.ROOM_FULL for a in answers if not a.granted)

        # Quiet final pass: holders get their role again; waiting jobs fill free roles.
        active = [j for j in range(jobs) if (r, j) not in released]
        for j in active:
            me = job_id(r, j)
            mine = {role for role in ROLES if holder[role] == me}
            before = {a.role for a in replies.get((r, j), []) if a.granted}
            assert before == mine, (me, before, holder)
            again = await ask(nc, RoleRequest(room=room_of[r], job_id=me, identity=f"agent {j}"))
            if mine:
                told = [a for a in replies.get((r, j), []) if a.granted]
                assert again == RoleReply(granted=True, role=mine.pop(), lease_s=LEASE_S, lease=told[0].lease)
            elif again.granted:
                assert again.role is not None and holder[again.role] is None
                holder[again.role] = me
            else:
                assert None not in holder.values(), (me, holder)
        final = fold_checked(await room_log(nc, room_of[r]))
        assert final == holder
        held = [h for h in final.values() if h is not None]
        assert len(held) == len(set(held)) == min(2, len(active))
        assert set(held) <= {job_id(r, j) for j in active}


async def test_a_job_racing_a_release_never_ends_up_with_two_roles(cluster: Cluster) -> None:
    """Why appends expect the room's sequence, not just the role's.

    Job J asks twice. Its first request reads the room while K holds customer and decides
    "support". Before that append lands, K releases customer and J's second request
    takes customer. An append checked against the support log alone would now succeed
    and J would hold both roles; checked against the room it fails and J is re-decided.
    """
    _, allocator = cluster.instances[0]
    room = f"race{uuid.uuid4().hex[:8]}"
    j = RoleRequest(room=room, job_id="AJ_j", identity="j")
    k = await allocator.allocate(RoleRequest(room=room, job_id="AJ_k", identity="k"))
    assert k == RoleReply(granted=True, role="customer", lease_s=LEASE_S, lease=k.lease)

    snap = await allocator.snapshot(room)
    assert snap is not None
    now = await allocator.server_now()
    stale = core.decide(j, core.lease_state(snap.customer, now), core.lease_state(snap.support, now), now, LEASE_S)
    assert stale.reply.role == "support" and stale.event is not None

    assert await allocator.release(RoleRelease(room=room, job_id="AJ_k")) == ReleaseReply(released=True,
                                                                                         role="customer")
    got = await allocator.allocate(j)
    assert got == RoleReply(granted=True, role="customer", lease_s=LEASE_S, lease=got.lease) and got.lease
    assert await allocator._append(room, stale.event, snap.seq) is None  # the room moved on

    assert await allocator.allocate(j) == got
    holder = fold_checked(await room_log(cluster.clients[0], room))
    assert holder == {"customer": "AJ_j", "support": None}
