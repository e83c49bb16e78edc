"""Graceful drain on the whole stack (`just up`, two worker processes):

- SIGTERM to a worker (supervisord's stop): it finishes the conversations it runs (each completes,
  no attempt retried) and takes no new job: livekit-server places a batch started during the drain
  on the other worker only (the draining worker reports itself full: livekit-agents' drain, plus
  our capacity heartbeat announcing no free slot);
- SIGTERM to the dispatcher: it stops admitting (no conversation dispatched while it is down),
  exits cleanly, and after a restart resumes the batch, which completes with every conversation
  completed once and the room audit clean.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from typing import Any

import nats
import pytest
from stack import stack_fixture

from infra.stack import supervisor
from shared import subjects
from shared.contracts import BatchFinished, ConversationDispatched, ConversationSettled

pytestmark = pytest.mark.e2e


stack = stack_fixture("drain", CROSSTALK_WORKERS="2", CROSSTALK_JOIN_DEADLINE_S="60")


def rpc(stack: Any) -> Any:
    return supervisor.rpc(stack.config()).supervisor


def state(stack: Any, name: str) -> dict[str, Any]:
    return dict(rpc(stack).getProcessInfo(name))


async def start_batch(stack: Any, batch_id: str, n: int, c: int, turns: int = 8) -> None:
    nc = await nats.connect(stack.nats_url)
    body = {"batch_id": batch_id, "conversations": n, "concurrency": c, "max_turns": turns}
    reply = json.loads((await nc.request(subjects.BATCH_START, json.dumps(body).encode(), timeout=30)).data)
    await nc.drain()
    assert reply["accepted"], reply


async def until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


async def finished(stack: Any, batch_id: str, timeout: float = 300) -> tuple[BatchFinished, list[Any]]:
    async def done() -> Any:
        evs = await stack.batch_events(batch_id)
        return evs if any(isinstance(e, BatchFinished) for e in evs) else None

    evs = await until(done, timeout, f"batch {batch_id} to finish")
    return next(e for e in evs if isinstance(e, BatchFinished)), evs


def rooms_in_log(stack: Any, log_name: str, batch_id: str) -> set[str]:
    rooms = set()
    for line in (stack.run_dir / "logs" / log_name).read_text(errors="replace").splitlines():
        if '"ready announced"' in line and batch_id in line:
            rooms.add(json.loads(line)["room"])
    return rooms


async def test_sigterm_to_a_worker_finishes_its_conversations_and_takes_no_new_job(stack: Any) -> None:
    await start_batch(stack, "drain-a", 4, 4)
    await until(lambda: rooms_in_log(stack, "worker.log", "drain-a"), 120,
                "the first worker to run a conversation of drain-a")
    rpc(stack).stopProcess("worker", False)  # SIGTERM, as `just down` and supervisorctl stop send it
    await until(lambda: "worker draining" in (stack.run_dir / "logs" / "worker.log").read_text(),
                30, "the worker to start draining")
    await start_batch(stack, "drain-b", 2, 2)  # placed while the first worker drains
    done_a, evs_a = await finished(stack, "drain-a")
    done_b, _ = await finished(stack, "drain-b")
    assert (done_a.completed, done_a.failed) == (4, 0), done_a
    assert (done_b.completed, done_b.failed) == (2, 0), done_b
    settled = [e for e in evs_a if isinstance(e, ConversationSettled)]
    assert [s for s in settled if s.retry or s.outcome != "completed"] == [], settled
    on_draining = rooms_in_log(stack, "worker.log", "drain-a")
    assert on_draining, "the draining worker ran none of drain-a: nothing was drained"
    await until(lambda: state(stack, "worker")["statename"] == "STOPPED", 60,
                "the drained worker to exit")
    info = state(stack, "worker")
    assert info["exitstatus"] == 0, info
    assert rooms_in_log(stack, "worker.log", "drain-b") == set()
    assert len(rooms_in_log(stack, "worker-2.log", "drain-b")) == 2  # every job of drain-b went there
    rpc(stack).startProcess("worker", True)


async def test_sigterm_to_the_dispatcher_stops_admitting_and_it_resumes_after_restart(stack: Any) -> None:
    await start_batch(stack, "drain-d", 6, 2, turns=6)

    async def one_settled() -> bool:
        return any(isinstance(e, ConversationSettled) for e in await stack.batch_events("drain-d"))

    await until(one_settled, 180, "a first conversation of drain-d to settle")
    rpc(stack).stopProcess("dispatcher", True)  # SIGTERM; returns once it exited
    info = state(stack, "dispatcher")
    assert info["statename"] == "STOPPED" and info["exitstatus"] == 0, info
    before = [e for e in await stack.batch_events("drain-d") if isinstance(e, ConversationDispatched)]
    await asyncio.sleep(8)  # conversations still settle meanwhile; nothing may be dispatched
    during = [e for e in await stack.batch_events("drain-d") if isinstance(e, ConversationDispatched)]
    assert during == before, "a conversation was dispatched while the dispatcher was stopped"
    assert len({e.conversation_id for e in before}) < 6, "all admitted before the stop: nothing left to show"
    rpc(stack).startProcess("dispatcher", True)
    done, evs = await finished(stack, "drain-d")
    assert (done.completed, done.failed) == (6, 0), done
    final = [e for e in evs if isinstance(e, ConversationSettled) and not e.retry]
    assert sorted(e.conversation_id for e in final) == sorted({e.conversation_id for e in final})
    assert all(e.outcome == "completed" for e in final) and len(final) == 6
    replays = [json.loads(line) for line in (stack.run_dir / "logs" / "dispatcher.log").read_text().splitlines()
               if '"replayed batch events"' in line]
    assert replays[-1]["running"] >= 1, replays  # the restarted dispatcher resumed the running batch
