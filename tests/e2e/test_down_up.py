"""`just down` in the middle of a batch loses nothing that `just up` cannot resume: supervisord stops
the workers first (each drains: its conversations finish), then the services, then the servers;
JetStream's store and the data dir stay; `just up` again and the dispatcher resumes the batch,
which ends with every conversation completed once and every transcript contiguous."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from stack import Stack, stack_fixture

from shared import subjects
from shared.contracts import BatchFinished, ConversationSettled

pytestmark = pytest.mark.e2e


stack = stack_fixture("downup", scope="function", CROSSTALK_WORKERS="2")


async def test_just_down_mid_batch_then_just_up_resumes_it(stack: Stack) -> None:
    nc = await nats.connect(stack.nats_url)
    body = {"batch_id": "downup-1", "conversations": 8, "concurrency": 2, "max_turns": 6}
    reply = json.loads((await nc.request(subjects.BATCH_START, json.dumps(body).encode(), timeout=30)).data)
    await nc.drain()
    assert reply["accepted"], reply
    deadline = time.monotonic() + 180
    while not any(isinstance(e, ConversationSettled) for e in await stack.batch_events("downup-1")):
        assert time.monotonic() < deadline, "no conversation settled"
        await asyncio.sleep(0.5)

    down = stack.just("down", timeout=240)
    assert down.returncode == 0, down.stdout + down.stderr
    assert stack.processes() == []
    stack.up()

    finished = None
    deadline = time.monotonic() + 400
    while finished is None:
        assert time.monotonic() < deadline, "the batch did not finish after `just up`"
        evs = await stack.batch_events("downup-1")
        finished = next((e for e in evs if isinstance(e, BatchFinished)), None)
        await asyncio.sleep(1)
    assert (finished.completed, finished.failed) == (8, 0), finished
    final = [e for e in evs if isinstance(e, ConversationSettled) and not e.retry]
    assert len(final) == 8 and len({e.conversation_id for e in final}) == 8
    assert all(e.outcome == "completed" for e in final), final
    conv = stack.data_dir / "batches" / "downup-1" / "conversations"
    for path in sorted(conv.glob("*.jsonl")):
        turns = [json.loads(x)["turn"] for x in path.read_bytes().splitlines()]
        assert turns == list(range(len(turns))) and turns, (path.name, turns)
    assert len(list(conv.glob("*.jsonl"))) == 8
