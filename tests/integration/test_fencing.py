"""Fenced leases end to end on a real nats-server: allocator, role.renew, the worker's keeper, the sink.

A stale holder (its lease expired while it was paused, and another job took its role)
renews: refused ``superseded``; asks again: denied, never given the other role; its
later turns, published to the real stream, never reach the transcript, while the new
holder's do. Plus: a conflicting text for a stored turn is kept out and counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from prometheus_client import CollectorRegistry
from support.harness import wait_for
from support.servers import Server, start_nats
from support.sink import drained, running_sink

from services.allocator import core
from services.allocator.main import Allocator
from services.sink import core as sink_core
from services.sink.main import Sink
from shared import bus, contracts, subjects
from shared.contracts import RenewReply, RoleRenew, RoleReply, RoleRequest, TurnRecorded
from shared.metrics import AllocatorMetrics
from worker.lifecycle.lease import LeaseKeeper

LEASE_S = 1.0


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A nats-server of its own: only this module's short-lease allocator answers role requests."""
    srv = start_nats(tmp_path_factory.mktemp("fencing") / "nats")
    yield srv
    srv.stop()


@pytest.fixture
async def stack(own_nats: Server, tmp_path: Path, unique: str) -> AsyncIterator[tuple[Client, Allocator, Sink]]:
    anc = await nats.connect(own_nats.url)
    allocator = Allocator(anc, await bus.jetstream(anc), lease_s=LEASE_S, metrics=AllocatorMetrics(CollectorRegistry()))
    await allocator.start()
    client = await nats.connect(own_nats.url)
    try:
        async with running_sink(own_nats.url, tmp_path, f"fence-{unique}") as sink:
            yield client, allocator, sink
    finally:
        await allocator.stop()
        for c in (client, anc):
            await c.drain()


async def ask(nc: Client, req: RoleRequest) -> RoleReply:
    msg = await nc.request(subjects.ROLE_REQUEST, contracts.encode(req), timeout=5)
    return contracts.decode(msg.data, RoleReply)


async def renew(nc: Client, r: RoleRenew) -> RenewReply:
    msg = await nc.request(subjects.ROLE_RENEW, contracts.encode(r), timeout=5)
    return contracts.decode(msg.data, RenewReply)


def turn(batch: str, n: int, text: str, room: str, lease: int | None) -> TurnRecorded:
    now = time.time()
    return TurnRecorded(batch_id=batch, conversation_id="c1", attempt=1, turn=n,
                        role="customer" if n % 2 == 0 else "support", text=text, started_at=now, ended_at=now,
                        room=room, lease=lease)


async def publish(nc: Client, t: TurnRecorded) -> None:
    await bus.publish(nc.jetstream(), subjects.conv_event(t.batch_id, t.conversation_id, "turn"), t)


def transcript(data: Path, batch: str) -> list[tuple[int, str]]:
    path = data / "batches" / batch / "conversations" / "c1.jsonl"
    if not path.exists():
        return []
    return [(line.turn, line.text) for line in map(sink_core.decode_line, path.read_bytes().splitlines())]


async def test_a_stale_holder_is_refused_denied_and_never_transcribed(
    stack: tuple[Client, Allocator, Sink], tmp_path: Path, unique: str
) -> None:
    nc, allocator, sink = stack
    batch, room = f"f-{unique}", f"f-{unique}-c1-1"
    refused = sink.metrics.turns_refused

    # A (customer) and B (support) are granted; B keeps its lease alive the way a worker does.
    a_sent = time.monotonic()
    a = await ask(nc, RoleRequest(room=room, job_id="AJ_a", identity="a"))
    b_sent = time.monotonic()
    b = await ask(nc, RoleRequest(room=room, job_id="AJ_b", identity="b"))
    assert (a.role, b.role) == ("customer", "support") and a.lease and b.lease and a.lease != b.lease
    b_keeper = LeaseKeeper(nc, room=room, job_id="AJ_b", role="support", lease=b.lease, lease_s=LEASE_S,
                           sent_at=b_sent)
    b_task = asyncio.create_task(b_keeper.run())
    a_keeper = LeaseKeeper(nc, room=room, job_id="AJ_a", role="customer", lease=a.lease, lease_s=LEASE_S,
                           sent_at=a_sent)
    try:
        await publish(nc, turn(batch, 0, "A: hello, I cannot log in", room, a.lease))
        await publish(nc, turn(batch, 1, "B: let me help", room, b.lease))
        await wait_for(lambda: len(transcript(tmp_path, batch)) == 2, what="turns 0 and 1")

        # A pauses (never renews): its lease runs out on server time. A turn it publishes now is refused.
        await asyncio.sleep(LEASE_S * 1.3)
        assert not a_keeper.valid()  # the worker itself would no longer speak
        await publish(nc, turn(batch, 2, "A (expired): are you there?", room, a.lease))
        await wait_for(lambda: refused.labels("expired")._value.get() == 1, what="expired turn refused")

        # C takes the expired customer role over.
        c = await ask(nc, RoleRequest(room=room, job_id="AJ_c", identity="c"))
        assert c.granted and c.role == "customer" and c.lease is not None and c.lease > a.lease

        # The stale holder wakes up: its renewal is refused and it is never granted a role.
        assert await renew(nc, RoleRenew(room=room, job_id="AJ_a", role="customer", lease=a.lease)) == RenewReply(
            renewed=False, reason="superseded")
        await a_keeper.renew_once()  # the worker's keeper gives up on its own clock, without asking
        assert a_keeper.lost is not None and a_keeper.lost.startswith("not renewed in time")
        # one whose clock believed the lease lived (a paused process's last renewal in flight) is told
        believer = LeaseKeeper(nc, room=room, job_id="AJ_a", role="customer", lease=a.lease, lease_s=LEASE_S,
                               sent_at=time.monotonic())
        await believer.renew_once()
        assert believer.lost == "superseded" and not believer.valid()
        denied = RoleReply(granted=False, reason=core.LEASE_ENDED)
        assert await ask(nc, RoleRequest(room=room, job_id="AJ_a", identity="a")) == denied
        assert await ask(nc, RoleRequest(room=room, job_id="AJ_a", identity="a", prefer="support")) == denied
        # a wrong token is refused too, and renew never grants
        assert (await renew(nc, RoleRenew(room=room, job_id="AJ_c", role="customer", lease=b.lease))).reason == \
            "unknown"
        assert (await renew(nc, RoleRenew(room=f"x{unique}", job_id="AJ_z", role="customer", lease=1))).reason == \
            "unknown"
        assert (await ask(nc, RoleRequest(room=f"x{unique}", job_id="AJ_z", identity="z"))).role == "customer"

        # Its later turns (stale lease, racing the new holder) never reach the transcript; C's and B's do.
        await publish(nc, turn(batch, 2, "A (stale): I'll take it from here", room, a.lease))
        await publish(nc, turn(batch, 2, "C: hi, I am the customer now", room, c.lease))
        await publish(nc, turn(batch, 3, "B: welcome back", room, b.lease))
        await publish(nc, turn(batch, 4, "A (stale): ignore that", room, a.lease))
        await publish(nc, turn(batch, 4, "A (claims support's token)", room, b.lease))  # token of another role
        await publish(nc, turn(batch, 4, "A (no token)", room, None))
        await wait_for(lambda: drained(sink), what="all turns settled")
        assert transcript(tmp_path, batch) == [
            (0, "A: hello, I cannot log in"), (1, "B: let me help"), (2, "C: hi, I am the customer now"),
            (3, "B: welcome back"),
        ]
        assert {r: refused.labels(r)._value.get() for r in ("expired", "superseded", "unknown", "no_lease")} == {
            "expired": 1, "superseded": 2, "unknown": 1, "no_lease": 1}
        assert b_keeper.lost is None and b_keeper.renewals >= 3  # B renewed all along
        assert sink.metrics.turns_written._value.get() == 4
    finally:
        b_task.cancel()


async def test_a_different_text_for_a_stored_turn_is_kept_out_counted_and_flagged(
    stack: tuple[Client, Allocator, Sink], tmp_path: Path, unique: str
) -> None:
    nc, _, sink = stack
    batch, room = f"k-{unique}", f"k-{unique}-c1-1"
    sent = time.monotonic()
    a = await ask(nc, RoleRequest(room=room, job_id="AJ_a", identity="a"))
    keeper = LeaseKeeper(nc, room=room, job_id="AJ_a", role="customer", lease=a.lease or 0, lease_s=LEASE_S,
                         sent_at=sent)
    task = asyncio.create_task(keeper.run())
    try:
        await publish(nc, turn(batch, 0, "नमस्ते, original", room, a.lease))
        await wait_for(lambda: transcript(tmp_path, batch) == [(0, "नमस्ते, original")], what="turn 0")
        await publish(nc, turn(batch, 0, "नमस्ते, original", room, a.lease))  # a redelivery: duplicate
        await publish(nc, turn(batch, 0, "something else entirely", room, a.lease))  # a conflict
        # a conflict on a turn still held (out of order) keeps the first text
        await publish(nc, turn(batch, 2, "held first", room, a.lease))
        await publish(nc, turn(batch, 2, "held second", room, a.lease))
        await wait_for(lambda: sink.metrics.conflicts._value.get() == 2, what="conflicts counted")
        doc_path = tmp_path / "batches" / batch / "batch.json"
        await wait_for(lambda: doc_path.exists() and json.loads(doc_path.read_bytes())["conversations"]["c1"]
                       ["conflicts"] == 2, what="conversation flagged")
        assert transcript(tmp_path, batch) == [(0, "नमस्ते, original")]
        assert sink.metrics.duplicates._value.get() == 1
    finally:
        task.cancel()
