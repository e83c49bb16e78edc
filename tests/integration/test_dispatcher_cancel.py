"""``batch.cancel`` against a real nats-server, the dispatcher process, fake agents and the sink.

A batch of many conversations at low concurrency is cancelled mid-way: nothing is dispatched
after the cancel is acknowledged, the running ones settle, the batch finishes ``cancelled`` with
counts that add up (in the log and in the sink's batch.json), a restarted dispatcher keeps it so,
the judge judges only what ran, and bad cancels name the field and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from support.harness import (
    Procs,
    agent_name,
    all_batch_events,
    batch_events,
    dispatcher_started,
    wait_finished,
    wait_for,
)
from support.sink import running_sink

from services.judge.batch import judge_to_the_end
from services.judge.store import BatchFiles
from shared import contracts, scenarios, subjects
from shared.contracts import (
    BatchCancelled,
    BatchFinished,
    BatchReply,
    ConversationDispatched,
    ConversationSettled,
)

pytestmark = pytest.mark.timeout(240)


async def cancel(nc: Client, body: bytes) -> BatchReply:
    msg = await nc.request(subjects.BATCH_CANCEL, body, timeout=20)
    return contracts.decode(msg.data, BatchReply)


async def cli(nats_url: str, data: Path, *args: str) -> tuple[int, str]:
    """``crosstalk <args>`` as a user runs it: its exit code and what it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env={**os.environ, "NATS_URL": nats_url, "CROSSTALK_DATA_DIR": str(data)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def dispatched(events: list[object]) -> list[str]:
    return [e.conversation_id for e in events if isinstance(e, ConversationDispatched)]


async def test_a_cancelled_batch_starts_nothing_new_and_ends_cancelled_across_a_restart(
        procs: Procs, bus_conn: tuple[Client, JetStreamContext], fresh_nats: str, tmp_path: Path) -> None:
    nc, js = bus_conn
    name = agent_name()
    procs.allocator()
    for _ in range(2):
        procs.fake_agent(name, talk_s=1.0)
    env = {"CROSSTALK_AGENT_NAME": name, "CROSSTALK_DISPATCH_RATE": "4", "CROSSTALK_JOIN_DEADLINE_S": "15"}
    dispatcher = procs.dispatcher(**env)
    await dispatcher_started(js)
    data = tmp_path / "data"
    bid = f"cancel-{uuid.uuid4().hex[:6]}"
    n = 40
    async with running_sink(fresh_nats, data, f"sink-{bid}", finish_retry_s=0.2, finish_max_deliveries=5):
        start = await nc.request(subjects.BATCH_START, contracts.encode(
            {"batch_id": bid, "conversations": n, "concurrency": 2}), timeout=20)
        assert contracts.decode(start.data, BatchReply).accepted

        async def some_settled() -> bool:
            return sum(isinstance(e, ConversationSettled) for e in await batch_events(js, bid)) >= 3

        await wait_for(some_settled, 90, "three settled conversations")
        reply = await cancel(nc, contracts.encode({"batch_id": bid}))
        assert reply == BatchReply(accepted=True, batch_id=bid)
        at_ack = dispatched(await batch_events(js, bid))

        finished = await wait_finished(js, bid, 90)
        events = await batch_events(js, bid)
        # Nothing dispatched after the cancel: not in the log after BatchCancelled, not since the reply.
        cut = next(i for i, e in enumerate(events) if isinstance(e, BatchCancelled))
        assert dispatched(events[cut:]) == []
        assert dispatched(events) == at_ack
        started = set(at_ack)
        assert 3 <= len(started) < n
        assert finished.status == "cancelled"
        assert (finished.requested, finished.cancelled) == (n, n - len(started))
        assert finished.completed + finished.failed + finished.cancelled == n
        assert sum(isinstance(e, BatchCancelled) for e in events) == 1

        # Repeated: idempotent. Bad: the field named, nothing changed.
        assert (await cancel(nc, contracts.encode({"batch_id": bid}))).duplicate
        before = await all_batch_events(js)
        for body, field in ((b'{"batch_id": "Not An Id"}', "batch_id"), (b"{}", "batch_id"),
                            (b'{"batch_id": "no-such-batch"}', "batch_id"), (b'{"batch_id": "x", "now": 1}', "now"),
                            (b"cancel it", "$")):
            bad = await cancel(nc, body)
            assert (bad.accepted, bad.field) == (False, field), (body, bad)
            assert bad.reason
        code, out = await cli(fresh_nats, data, "batch", "cancel", "no-such-batch")
        assert code == 2 and "batch_id: unknown batch" in out
        assert await all_batch_events(js) == before

        # The sink's batch.json says cancelled, with the same counts.
        async def doc_finished() -> dict[str, object] | None:
            path = data / "batches" / bid / "batch.json"
            doc = json.loads(path.read_text()) if path.exists() else None
            return doc if doc and doc["status"] != "running" else None

        doc = await wait_for(doc_finished, 30, "batch.json to finish")
    assert doc["status"] == "cancelled" and doc["cancelled"] == finished.cancelled
    assert doc["requested"] == n and doc["completed"] + doc["failed"] + doc["cancelled"] == n
    assert set(doc["conversations"]) == started  # type: ignore[arg-type]
    code, out = await cli(fresh_nats, data, "batch", "cancel", bid, "--json")
    assert code == 0 and json.loads(out) == {"accepted": True, "batch_id": bid, "field": None,
                                             "reason": "already cancelled; the first cancel stands", "duplicate": True}
    code, out = await cli(fresh_nats, data, "batch", "watch", bid, "--wait", "10")
    assert f"batch {bid} cancelled" in out and f"{finished.cancelled} never started (cancelled)" in out, out
    code, out = await cli(fresh_nats, data, "batch", "list", "--json")
    assert code == 0 and [(d["batch_id"], d["status"], d["cancelled"]) for d in json.loads(out)] == [
        (bid, "cancelled", finished.cancelled)]

    # A restart keeps it cancelled: it resumes nothing, and a cancel is still a repeat.
    dispatcher.stop()
    dispatcher = procs.dispatcher(**env)
    await asyncio.sleep(3.0)
    assert (await cancel(nc, contracts.encode({"batch_id": bid}))).duplicate
    assert await batch_events(js, bid) == events
    assert [e for e in events if isinstance(e, BatchFinished)] == [finished]

    # The judge judges what ran: a judgment per started conversation, none for the never-started.
    files = BatchFiles(data, bid)
    written, judged = await judge_to_the_end(files, scenarios.library(), None)
    assert {j.conversation_id for j in written} == started
    assert judged is not None and judged.conversations == len(started)
