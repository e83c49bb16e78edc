"""The judge service on a real nats-server: it waits for the sink's files, survives a SIGKILL, never judges twice.

The batch's events are published by the test (as the dispatcher would) and the sink's files
are written by the test, so the judge alone is under test. No LLM judge here (checks only, the
expectations not_judged): the LLM path runs in tests/e2e/test_eval.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from support.harness import Procs

from services.judge.batch import judge_batch
from services.judge.store import BatchFiles
from shared import batch_plan, bus, scenarios, subjects
from shared.contracts import BatchAccepted, BatchEvent, BatchFinished, BatchJudged, BatchSpec

READY = b'"msg": "judge consuming"'


def write_sink_files(data: Path, bid: str, status: str) -> None:
    sc = scenarios.get("hi-account-help")
    files = BatchFiles(data, bid)
    convs: dict[str, Any] = {}
    for i in range(3):
        cid = f"{bid}-{i:05d}"
        path = files.transcript(cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = sc.script if i < 2 else sc.script[:1]
        path.write_text("".join(json.dumps({
            "conversation_id": cid, "turn": n, "role": line.role, "text": line.text, "started_at": 1.0,
            "ended_at": 2.0, "attempt": 1, "batch_id": bid}, ensure_ascii=False) + "\n"
            for n, line in enumerate(lines)), encoding="utf-8")
        convs[cid] = ({"outcome": "completed", "reason": "end_conversation", "attempts": 1, "turns": len(lines),
                       "ended": "end_conversation: support"} if i < 2 else
                      {"outcome": "failed", "reason": "join_timeout", "attempts": 3, "turns": 1})
    files.batch_json.write_text(json.dumps({"batch_id": bid, "status": status, "conversations": convs}))


async def wait_for(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def test_judges_once_the_sink_is_done_across_a_sigkill(procs: Procs, bus_conn: Any, tmp_path: Path) -> None:
    _, js = bus_conn
    data, bid = tmp_path / "data", "jb-1"
    spec = BatchSpec(batch_id=bid, conversations=3, concurrency=3, scenario="hi-account-help", language="hi",
                     max_turns=8, mode="text", trials=3,
                     scenarios=batch_plan.batch_scenarios([scenarios.get("hi-account-help")]))
    write_sink_files(data, bid, status="running")
    await bus.publish(js, subjects.batch_events(bid), BatchAccepted(spec=spec, at=1.0))
    await bus.publish(js, subjects.batch_events(bid), BatchFinished(
        batch_id=bid, status="failed", requested=3, completed=2, failed=1, started_at=1.0, finished_at=2.0))
    env = {"CROSSTALK_DATA_DIR": str(data), "CROSSTALK_JUDGE_WAIT_S": "600"}
    judge = procs.start("judge", "services.judge", env, ready_line=READY)
    files = BatchFiles(data, bid)
    await wait_for(lambda: files.plan() == spec)
    await asyncio.sleep(3)
    assert files.judgments() == []  # batch.json still says running: nothing judged yet

    judge.kill()
    write_sink_files(data, bid, status="failed")
    judge.start()
    await wait_for(lambda: files.judged() is not None)
    got = {j.conversation_id: j for j in files.judgments()}
    # no judge configured: the checks pass, the expectations are not_judged -- inconclusive, never a pass
    assert [got[f"{bid}-{i:05d}"].verdict for i in range(3)] == ["inconclusive", "inconclusive", None]
    assert [got[f"{bid}-{i:05d}"].not_judged for i in range(2)] == [2, 2]
    assert all(c.verdict == "pass" for c in got[f"{bid}-00000"].criteria if c.kind == "check")
    assert got[f"{bid}-00002"].status == "infra_failure" and got[f"{bid}-00002"].infra_failure == "join_timeout"
    # judging finished visibly: BatchJudged on the batch's subject, the same counts in judged.json
    events = await bus.replay(js, subjects.batch_events(bid), BatchEvent)
    judged = [e for e in events if isinstance(e, BatchJudged)]
    assert judged == [files.judged()], events
    assert judged[0].verdicts == {"pass": 0, "fail": 0, "inconclusive": 2, "infra_failure": 1}
    assert judged[0].not_judged == 2
    assert [got[f"{bid}-{i:05d}"].trial for i in range(3)] == [1, 2, 3]

    stamps = {p: p.stat().st_mtime_ns for p in (files.dir / "judgments").glob("*.json")}
    judge.stop()
    judge.start()  # the finished batch was acked: a restart judges nothing again
    await asyncio.sleep(3)
    assert {p: p.stat().st_mtime_ns for p in (files.dir / "judgments").glob("*.json")} == stamps
    assert await judge_batch(files, scenarios.library(), None) == []  # and a second run skips what is judged
