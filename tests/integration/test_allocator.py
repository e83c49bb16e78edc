"""The allocator against a real nats-server, run as separate `python -m services.allocator` processes.

- 200 rooms x 4 concurrent jobs over 3 instances and several client connections: exactly
  one customer and one support per room, the other two denied, every round; repeats
  (and duplicates) get the same answers.
- SIGKILL an instance in the middle of that and start it again: same invariant, and every
  earlier answer is repeated unchanged.
- A lease that is not renewed expires and goes to the next job; a renewed one never does.
- Bad requests get an error naming the field; the service keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from support.harness import Proc, Procs
from support.servers import Server, start_nats

from services.allocator import core
from shared import bus, contracts, subjects
from shared.contracts import LeaseEvent, ReleaseReply, Role, RoleRelease, RoleReply, RoleRequest

ROOMS = 200
JOBS_PER_ROOM = 4
INSTANCES = 3
CLIENTS = 4


def metric_sum(procs: list[Proc], name: str, **labels: str) -> float:
    return sum(p.metric(name, **labels) for p in procs)


def stop_all(procs: Procs) -> None:
    procs.stop_all()
    for p in procs.started:
        assert b"Traceback" not in p.output(), p.log()[-3000:]


@pytest.fixture(scope="module")
def allocators(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    procs = Procs(tmp_path_factory.mktemp("allocators"), nats_url)
    try:
        yield [procs.allocator() for _ in range(INSTANCES)]
    finally:
        stop_all(procs)


@pytest.fixture(scope="module")
async def clients(nats_url: str) -> AsyncIterator[list[Client]]:
    conns = [await nats.connect(nats_url, name=f"client-{i}") for i in range(CLIENTS)]
    yield conns
    for c in conns:
        await c.drain()


async def ask(nc: Client, request: RoleRequest, *, timeout: float = 2.0, attempts: int = 10) -> RoleReply:
    """A worker's role request: retried when the instance that had it died (no reply)."""
    body = contracts.encode(request)
    for _ in range(attempts):
        try:
            msg = await nc.request(subjects.ROLE_REQUEST, body, timeout=timeout)
        except (NatsTimeoutError, NoRespondersError):
            await asyncio.sleep(0.1)
            continue
        return contracts.decode(msg.data, RoleReply)
    raise AssertionError(f"no reply to {request} after {attempts} attempts")


async def release(nc: Client, room: str, job_id: str) -> ReleaseReply:
    msg = await nc.request(subjects.ROLE_RELEASE, contracts.encode(RoleRelease(room=room, job_id=job_id)), timeout=5)
    return contracts.decode(msg.data, ReleaseReply)


async def last_event(nc: Client, room: str, role: Role) -> LeaseEvent:
    raw = await nc.jetstream().get_last_msg("ROLES", subjects.role_lease(room, role), direct=True)
    return contracts.decode(raw.data, LeaseEvent)


def room_requests(prefix: str, rng: random.Random) -> list[RoleRequest]:
    return [
        RoleRequest(room=f"{prefix}-{r}", job_id=f"AJ_{prefix}_{r}_{j}", identity=f"agent-{r}-{j}",
                    prefer=rng.choice([None, None, "customer", "support"]))
        for r in range(ROOMS) for j in range(JOBS_PER_ROOM)
    ]


def check_rooms(requests: list[RoleRequest], replies: list[RoleReply]) -> dict[str, dict[str, RoleReply]]:
    """Exactly one customer and one support per room, to distinct jobs; the other two denied."""
    by_room: dict[str, dict[str, RoleReply]] = collections.defaultdict(dict)
    for q, a in zip(requests, replies, strict=True):
        previous = by_room[q.room].setdefault(q.job_id, a)
        assert previous == a, f"{q.job_id}: {previous} then {a}"
    for room, answers in by_room.items():
        granted = sorted(a.role or "" for a in answers.values() if a.granted)
        assert granted == ["customer", "support"], (room, answers)
        denied = [a for a in answers.values() if not a.granted]
        assert len(denied) == JOBS_PER_ROOM - 2 and all(a.reason == "room full" for a in denied), (room, answers)
    return by_room


async def fire(
    clients: list[Client], requests: list[RoleRequest], *, spread_s: float = 0.0, done: list[int] | None = None
) -> list[RoleReply]:
    async def one(i: int, q: RoleRequest) -> RoleReply:
        if spread_s:
            await asyncio.sleep(random.uniform(0, spread_s))
        reply = await ask(clients[i % len(clients)], q)
        if done is not None:
            done.append(i)
        return reply

    return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(requests))))


@pytest.mark.parametrize("round_", range(5))
async def test_200_rooms_4_jobs_3_instances(
    allocators: list[Proc], clients: list[Client], unique: str, round_: int
) -> None:
    rng = random.Random(round_)
    requests = room_requests(f"m{unique}", rng)
    # shuffled, with a quarter sent twice at once (a duplicate request is not a second job)
    order = requests + rng.sample(requests, len(requests) // 4)
    rng.shuffle(order)
    grants_before = [p.metric("crosstalk_role_grants_total") for p in allocators]
    first = check_rooms(order, await fire(clients, order))
    # every instance took part
    assert all(p.metric("crosstalk_role_grants_total") > b for p, b in zip(allocators, grants_before, strict=True))

    again = list(requests)
    rng.shuffle(again)
    second = check_rooms(again, await fire(clients, again))
    assert second == first  # every answer repeated unchanged

    # The log agrees: each role's last event names the job that was told it holds it.
    for room, answers in list(first.items())[:: ROOMS // 20]:
        for job_id, a in answers.items():
            if a.granted:
                assert a.role is not None
                ev = await last_event(clients[0], room, a.role)
                assert (ev.job_id, ev.kind) == (job_id, "renewed")


async def test_sigkill_an_instance_mid_run_and_restart(
    allocators: list[Proc], clients: list[Client], unique: str
) -> None:
    rng = random.Random(7)
    requests = room_requests(f"k{unique}", rng)
    rng.shuffle(requests)
    victim = allocators[0]
    done: list[int] = []

    async def chaos() -> int:
        await asyncio.sleep(0.5)
        served = victim.metric("crosstalk_role_grants_total")
        await asyncio.to_thread(victim.kill)
        answered_at_kill = len(done)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(victim.start)
        assert served > 0  # the victim was taking part when it died
        return answered_at_kill

    replies, answered_at_kill = await asyncio.gather(fire(clients, requests, spread_s=1.5, done=done), chaos())
    assert 0 < answered_at_kill < len(requests)  # killed mid-run
    first = check_rooms(requests, replies)
    assert victim.alive()  # back up

    grants_before = victim.metric("crosstalk_role_grants_total")
    again = list(requests)
    rng.shuffle(again)
    second = check_rooms(again, await fire(clients, again))
    assert second == first
    assert victim.metric("crosstalk_role_grants_total") > grants_before  # the restarted instance serves


BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("not json", b"{nope", "$"),
    ("not an object", b'["room"]', "$"),
    ("empty", b"", "$"),
    ("non-utf8", b'{"room":"r\xff\xfe","job_id":"j","identity":"i"}', "$"),
    ("missing job_id", b'{"room":"r","identity":"i"}', "job_id"),
    ("missing room", b'{"job_id":"j","identity":"i"}', "room"),
    ("missing identity", b'{"room":"r","job_id":"j"}', "identity"),
    ("room wrong type", b'{"room":7,"job_id":"j","identity":"i"}', "room"),
    ("job_id wrong type", b'{"room":"r","job_id":["j"],"identity":"i"}', "job_id"),
    ("room with dot", b'{"room":"a.b","job_id":"j","identity":"i"}', "room"),
    ("room with star", b'{"room":"a*","job_id":"j","identity":"i"}', "room"),
    ("room with gt", b'{"room":">","job_id":"j","identity":"i"}', "room"),
    ("room with space", b'{"room":"a b","job_id":"j","identity":"i"}', "room"),
    ("room with tab", b'{"room":"a\\tb","job_id":"j","identity":"i"}', "room"),
    ("room too long", b'{"room":"' + b"r" * 129 + b'","job_id":"j","identity":"i"}', "room"),
    ("job_id with dot", b'{"room":"r","job_id":"j.1","identity":"i"}', "job_id"),
    ("empty identity", b'{"room":"r","job_id":"j","identity":""}', "identity"),
    ("bad prefer", b'{"room":"r","job_id":"j","identity":"i","prefer":"boss"}', "prefer"),
    ("near max_payload", b'{"room":"r","job_id":"j","identity":"' + b"x" * (1024 * 1024 - 4096) + b'"}', "$"),
]


async def test_bad_requests_name_the_field_and_the_service_keeps_serving(
    allocators: list[Proc], clients: list[Client], unique: str
) -> None:
    nc = clients[0]
    bad_before = metric_sum(allocators, "crosstalk_role_bad_requests_total")
    for name, body, field in BAD_REQUESTS:
        msg = await nc.request(subjects.ROLE_REQUEST, body, timeout=5)
        reply = contracts.decode(msg.data, RoleReply)
        assert not reply.granted and reply.role is None, name
        assert reply.field == field and reply.reason, (name, reply)
    for name, body, field in BAD_REQUESTS[:3] + BAD_REQUESTS[9:12]:
        msg = await nc.request(subjects.ROLE_RELEASE, body, timeout=5)
        rel = contracts.decode(msg.data, ReleaseReply)
        assert not rel.released and rel.field == field and rel.reason, (name, rel)
    assert metric_sum(allocators, "crosstalk_role_bad_requests_total") - bad_before == len(BAD_REQUESTS) + 6
    assert all(p.alive() for p in allocators)

    # Still serving, on every instance; a Hindi identity is stored byte-exact.
    room = f"bad{unique}"
    identity = "ग्राहक-एजेंट १"
    got = await ask(nc, RoleRequest(room=room, job_id="AJ_hi", identity=identity))
    assert got == RoleReply(granted=True, role="customer", lease_s=30.0, lease=got.lease) and got.lease
    ev = await last_event(nc, room, "customer")
    assert ev.identity.encode() == identity.encode()
    for i in range(12):
        assert (await ask(clients[i % CLIENTS], RoleRequest(room=room, job_id="AJ_hi", identity=identity))) == got

    # Release: only the holder can, once.
    assert await release(nc, room, "AJ_other") == ReleaseReply(released=False, reason="not holding a role in this room")
    assert await release(nc, room, "AJ_hi") == ReleaseReply(released=True, role="customer")
    assert await release(nc, room, "AJ_hi") == ReleaseReply(released=False, role="customer", reason="already released")
    assert (await last_event(nc, room, "customer")).kind == "released"
    nxt = await ask(nc, RoleRequest(room=room, job_id="AJ_next", identity="n"))
    assert nxt.granted and nxt.role == "customer" and nxt.lease is not None and nxt.lease > got.lease


# --------------------------------------------------------------------------- leases

LEASE_S = 1.0


@pytest.fixture(scope="module")
def short_lease(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[Proc]]]:
    """A nats-server of its own, so only short-lease instances answer in this queue group."""
    workdir = tmp_path_factory.mktemp("lease")
    srv = start_nats(workdir / "nats")
    procs = Procs(workdir, srv.url)
    try:
        yield srv, [procs.allocator(CROSSTALK_LEASE_S=str(LEASE_S)) for _ in range(2)]
    finally:
        stop_all(procs)
        srv.stop()


async def test_unrenewed_lease_expires_to_the_next_job_renewed_one_never(
    short_lease: tuple[Server, list[Proc]], unique: str
) -> None:
    srv, procs = short_lease
    nc = await nats.connect(srv.url)
    try:
        room = f"lease{unique}"
        a = RoleRequest(room=room, job_id="AJ_a", identity="a")
        b = RoleRequest(room=room, job_id="AJ_b", identity="b")
        c = RoleRequest(room=room, job_id="AJ_c", identity="c")
        customer = await ask(nc, a)
        assert customer == RoleReply(granted=True, role="customer", lease_s=LEASE_S, lease=customer.lease)
        b_support = await ask(nc, b)  # b never renews
        assert b_support == RoleReply(granted=True, role="support", lease_s=LEASE_S, lease=b_support.lease)
        b_lease = await last_event(nc, room, "support")
        assert await ask(nc, c) == RoleReply(granted=False, reason="room full")

        renewing = True

        async def renew_a() -> int:
            n = 0
            while renewing:
                assert await ask(nc, a) == customer  # a renewed lease is never lost
                n += 1
                await asyncio.sleep(LEASE_S / 5)
            return n

        renewer = asyncio.create_task(renew_a())
        c_answers: list[RoleReply] = []
        deadline = time.monotonic() + 10 * LEASE_S
        while time.monotonic() < deadline:
            got = await ask(nc, c)
            c_answers.append(got)
            if got.granted:
                break
            await asyncio.sleep(0.05)
        support = c_answers[-1]
        assert support.granted and support.role == "support", c_answers  # the expired support lease went to c
        assert support.lease is not None and b_support.lease is not None and support.lease > b_support.lease
        assert all(x == RoleReply(granted=False, reason="room full") for x in c_answers[:-1])
        c_lease = await last_event(nc, room, "support")
        assert c_lease.job_id == "AJ_c" and c_lease.at >= b_lease.expires_at  # never before expiry
        lost = RoleReply(granted=False, reason=core.LEASE_ENDED)
        assert await ask(nc, b) == lost  # b lost it, and is fenced for good
        # keep renewing a for a few more lease periods
        await asyncio.sleep(3 * LEASE_S)
        renewing = False
        renewals = await renewer

        assert renewals >= 10
        a_lease = await last_event(nc, room, "customer")
        assert (a_lease.job_id, a_lease.kind) == ("AJ_a", "renewed")
        # the whole customer log is a's: granted once, then renewals, never anyone else
        seen = await bus.replay(nc.jetstream(), subjects.role_lease(room, "customer"), LeaseEvent)
        assert seen and {e.job_id for e in seen} == {"AJ_a"}
        assert metric_sum(procs, "crosstalk_role_lease_expiries_total", role="support") == 1
        assert metric_sum(procs, "crosstalk_role_lease_expiries_total", role="customer") == 0

        # a stops renewing: after its lease, the next job gets customer
        await asyncio.sleep(LEASE_S * 1.2)
        d_reply = await ask(nc, RoleRequest(room=room, job_id="AJ_d", identity="d"))
        assert d_reply.granted and d_reply.role == "customer" and d_reply.lease != customer.lease
        assert metric_sum(procs, "crosstalk_role_lease_expiries_total", role="customer") == 1
        # The stale holder a asks again while support is free (c's lease expired too): it is
        # denied, never handed the other role.
        assert await ask(nc, a) == lost
        assert await ask(nc, RoleRequest(room=room, job_id="AJ_a", identity="a", prefer="support")) == lost
        e_reply = await ask(nc, RoleRequest(room=room, job_id="AJ_e", identity="e"))
        assert e_reply.granted and e_reply.role == "support"  # support was free: a was refused by the fence
    finally:
        await nc.drain()


def test_bad_configuration_names_the_variable(nats_url: str, tmp_path: Path) -> None:
    proc = Procs(tmp_path, nats_url).start("allocator", "services.allocator", {"CROSSTALK_LEASE_S": "soon"})
    assert proc.popen is not None and proc.popen.wait(60) == 2
    assert b"CROSSTALK_LEASE_S" in proc.output() and b"must be a number" in proc.output()
