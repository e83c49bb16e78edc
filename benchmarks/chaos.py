"""Chaos suite: real batches on the real stack, one fault injected mid-batch per batch.

    just chaos                              # every fault, 12 conversations @ 6 each
    python -m benchmarks.chaos --faults kill-sink,fill-data --runs 12x6

(from the repo root with ``PYTHONPATH=.:tests``, as ``just chaos`` sets it).

One stack (``just up`` on free ports, tests/e2e/stack.py) with its data dir on a small tmpfs
mount (so the disk can be filled), two worker processes. For each fault in turn: a batch starts;
once ``--trigger`` turns are stored on disk the fault is injected (a SIGKILL of one crosstalk
process, which supervisord restarts; livekit-server SIGSTOPped for longer than the join deadline,
then SIGCONTed; nats-server restarted; the data dir filled until ENOSPC, held, freed). Then the
batch must end with every conversation completed or failed with a reason, and is checked from
sources that could show it broken: every stored turn against what the scripted model served
(lost / altered / duplicated / misordered), the room audit in batch.json (livekit-server's own
webhooks joined with the grant log: two agents of one role = a double grant), duplicated turn
indexes in every transcript file (completed or not). ``recover_s``: from the end of the fault
until the faulted program is RUNNING and healthy again (supervisord, ``just status``) and a turn
was stored on disk after the fault ended (progress resumed), or the batch finished.
Writes benchmarks/results/chaos-<label>.json; exits non-zero on any lost/duplicated turn, double
grant, audit violation or unfinished batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
from e2e.stack import Stack

from benchmarks.bench_batch import (
    RESULTS,
    ROOT,
    check_roles,
    check_transcripts,
    collect,
    machine,
    read_served,
    wait_finished,
)
from benchmarks.chaos_faults import (
    CLUSTER_FAULTS,
    FAULTS,
    JOIN_DEADLINE_S,
    LIVEKIT_FAULTS,
    inject,
    unsettled_elsewhere,
)


def stored_turns(stack: Stack, batch_id: str) -> int:
    """Turn lines on disk for the batch (the sink's files), whatever their attempt."""
    conv = stack.data_dir / "batches" / batch_id / "conversations"
    total = 0
    for path in conv.glob("*.jsonl") if conv.is_dir() else ():
        try:
            total += path.read_bytes().count(b"\n")
        except OSError:
            pass
    return total


def duplicates_anywhere(stack: Stack, batch_id: str) -> int:
    """Turn indexes stored twice in any transcript file (failed conversations' too)."""
    conv = stack.data_dir / "batches" / batch_id / "conversations"
    dup = 0
    for path in conv.glob("*.jsonl") if conv.is_dir() else ():
        turns = [json.loads(x)["turn"] for x in path.read_bytes().splitlines() if x.strip()]
        dup += len(turns) - len(set(turns))
    return dup


def healthy(stack: Stack) -> bool:
    return stack.just("status", timeout=60).returncode == 0


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False


def batch_done(stack: Stack, batch_id: str) -> bool:
    async def last() -> bool:
        nc = await nats.connect(stack.nats_url.split(","), max_reconnect_attempts=0, connect_timeout=2)
        try:
            from shared import subjects
            from shared.contracts import BatchEvent, BatchFinished, decode_event

            msg = await nc.jetstream().get_last_msg("BATCH_EVENTS", subjects.batch_events(batch_id))
            return isinstance(decode_event(msg.data, BatchEvent), BatchFinished)
        finally:
            await nc.close()

    try:
        return asyncio.run(last())
    except Exception:
        return False


def sink_caught_up(stack: Stack, timeout: float) -> float | None:
    """Seconds until every sink consumer has nothing pending or unacknowledged (JetStream's own
    consumer info), or None at the timeout: the files are read only after the sink stored it all
    (a SIGKILLed sink's unacked turns come back after its ack wait, 30 s)."""
    from shared.streams import sink_consumers

    async def pending() -> int:
        nc = await nats.connect(stack.nats_url.split(","), max_reconnect_attempts=0, connect_timeout=2)
        try:
            js = nc.jetstream()
            total = 0
            for d in sink_consumers("sink"):
                info = await js.consumer_info(d.stream, d.config.durable_name)
                total += info.num_pending + info.num_ack_pending
            return total
        finally:
            await nc.close()

    t0 = time.monotonic()

    def done() -> bool:
        try:
            return asyncio.run(pending()) == 0
        except Exception:
            return False

    return round(time.monotonic() - t0, 1) if wait_until(done, timeout, interval=1) else None


def run_fault(stack: Stack, fault: str, n: int, c: int, turns: int, trigger: int, served_log: Path,
              timeout: float) -> dict[str, Any]:
    batch_id = f"chaos-{fault}-{int(time.time())}"

    async def start() -> None:
        nc = await nats.connect(stack.nats_url.split(","))
        body = {"batch_id": batch_id, "conversations": n, "concurrency": c, "max_turns": turns}
        reply = await nc.request("batch.start", json.dumps(body).encode(), timeout=30)
        assert json.loads(reply.data)["accepted"], reply.data
        await nc.drain()

    t0 = time.monotonic()
    asyncio.run(start())
    wait_until(lambda: stored_turns(stack, batch_id) >= trigger or batch_done(stack, batch_id), timeout)
    at_s = time.monotonic() - t0
    turns_before = stored_turns(stack, batch_id)
    detail = inject(stack, fault)
    ended = time.monotonic()
    stored_at_end = stored_turns(stack, batch_id)
    recovered = wait_until(lambda: healthy(stack) and (stored_turns(stack, batch_id) > stored_at_end
                                                        or batch_done(stack, batch_id)), timeout, interval=1)
    recover_s = round(time.monotonic() - ended, 1) if recovered else None
    finished = asyncio.run(wait_finished(stack.nats_url, batch_id, timeout=timeout))
    wall = time.monotonic() - t0
    sink_s = sink_caught_up(stack, timeout)
    events = asyncio.run(collect(stack.nats_url, batch_id))
    integrity = check_transcripts(stack.data_dir, batch_id, events["settled"], read_served(served_log))
    roles = check_roles(stack.data_dir, batch_id, events["settled"])
    if fault == "kill-livekit-node" and detail.get("node_id"):
        roles["unsettled_participants_not_on_the_killed_node"] = unsettled_elsewhere(stack, batch_id, detail["node_id"])
    final = [s for s in events["settled"] if not s.retry]
    reasons: dict[str, int] = {}
    for s in final:
        if s.outcome == "failed":
            reasons[s.reason or "(none)"] = reasons.get(s.reason or "(none)", 0) + 1
    retried_reasons: dict[str, int] = {}
    for s in events["settled"]:
        if s.retry:
            retried_reasons[s.reason or "(none)"] = retried_reasons.get(s.reason or "(none)", 0) + 1
    return {
        "fault": fault, "batch_id": batch_id, "conversations": n, "concurrency": c, "max_turns": turns,
        "fault_at_s": round(at_s, 1), "stored_turns_at_fault": turns_before, "fault_detail": detail,
        "fault_duration_s": round(ended - t0 - at_s, 1), "recover_s": recover_s,
        "completed": finished.completed, "failed": finished.failed,
        "settled_conversations": len({s.conversation_id for s in final}),
        "failed_without_reason": sum(1 for s in final if s.outcome == "failed" and not s.reason),
        "failure_reasons": reasons, "retried": sum(1 for s in events["settled"] if s.retry),
        "retry_reasons": retried_reasons, "wall_s": round(wall, 1),
        "sink_caught_up_after_finish_s": sink_s,
        **integrity, "duplicated_turns_any_file": duplicates_anywhere(stack, batch_id), **roles,
        "double_grants": roles["rooms_with_two_agents_of_one_role"],
    }


def bad(r: dict[str, Any]) -> list[str]:
    out = [k for k in ("lost_turns", "altered_turns", "duplicated_turns", "duplicated_turns_any_file",
                       "misordered_conversations", "double_grants", "agent_participants_without_a_grant",
                       "rooms_with_a_third_agent", "completed_rooms_without_one_of_each_role",
                       "audit_unsettled_conversations", "failed_without_reason") if r.get(k)]
    if "unsettled_participants_not_on_the_killed_node" in r and not r["unsettled_participants_not_on_the_killed_node"]:
        # every participant never reported gone was on the node that was killed (it cannot report)
        out = [k for k in out if k != "audit_unsettled_conversations"]
    if r["settled_conversations"] != r["conversations"] or r["completed"] + r["failed"] != r["conversations"]:
        out.append("not every conversation settled")
    if r["sink_caught_up_after_finish_s"] is None:
        out.append("sink never caught up")
    if r["recover_s"] is None:
        out.append("did not recover")
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| fault | when (s into batch, turns stored) | completed / failed / retried | turns lost | "
            "duplicates | double grants | time to recover (s) | failure reasons |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['fault']} | {r['fault_at_s']} s, {r['stored_turns_at_fault']} | {r['completed']} / {r['failed']} / "
            f"{r['retried']} | {r['lost_turns']} | {r['duplicated_turns'] + r['duplicated_turns_any_file']} | "
            f"{r['double_grants']} | {r['recover_s']} | {r['failure_reasons'] or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default="", help=f"comma list (default: all of {', '.join(FAULTS)}; "
                    f"with --nats-nodes 3: {', '.join(CLUSTER_FAULTS)}; with --livekit-nodes 2: "
                    f"{', '.join(LIVEKIT_FAULTS)})")
    ap.add_argument("--nats-nodes", type=int, choices=(1, 3), default=1, help="3: the NATS cluster profile")
    ap.add_argument("--livekit-nodes", type=int, choices=(1, 2), default=1, help="2: the two-node LiveKit profile")
    ap.add_argument("--runs", default="12x6", help="CONVERSATIONSxCONCURRENCY of each batch")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--trigger", type=int, default=10, help="inject once this many turns are stored")
    ap.add_argument("--tmpfs-mb", type=int, default=64, help="size of the data dir's tmpfs mount")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--label", default="")
    ap.add_argument("--tmp", default=str(ROOT / "run" / "chaos"))
    args = ap.parse_args()
    extra = (CLUSTER_FAULTS if args.nats_nodes == 3 else ()) + (LIVEKIT_FAULTS if args.livekit_nodes == 2 else ())
    known = FAULTS + extra
    faults = [f for f in args.faults.split(",") if f] or list(extra or FAULTS)
    for f in faults:
        if f not in known:
            ap.error(f"--faults: unknown {f!r}; known: {', '.join(known)}")
    n, c = (int(x) for x in args.runs.lower().split("x"))
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir=args.tmp))
    served_log = workdir / "model-served.jsonl"
    stack = Stack.create(workdir, CROSSTALK_WORKERS="2", CROSSTALK_JOIN_DEADLINE_S=str(JOIN_DEADLINE_S),
                         CROSSTALK_CONVERSATION_TIMEOUT_S="300", CROSSTALK_MAX_CONCURRENCY="200",
                         CROSSTALK_MODEL_SERVED_LOG=str(served_log), CROSSTALK_NATS_NODES=str(args.nats_nodes),
                         CROSSTALK_LIVEKIT_NODES=str(args.livekit_nodes))
    data = stack.data_dir
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mb}m,mode=0700", "tmpfs", str(data)],
                   check=True)
    rows: list[dict[str, Any]] = []
    out = RESULTS / f"chaos-{args.label or time.strftime('%Y%m%d')}.json"
    try:
        stack.up()
        for fault in faults:
            if not wait_until(lambda: healthy(stack), 180, interval=2):
                raise SystemExit(f"stack not healthy before {fault}: `just status` in {stack.run_dir}")
            time.sleep(3)  # workers registered with livekit-server
            r = run_fault(stack, fault, n, c, args.turns, args.trigger, served_log, args.timeout)
            r["problems"] = bad(r)
            rows.append(r)
            print(f"{fault}: at {r['fault_at_s']} s, completed {r['completed']} failed {r['failed']} retried "
                  f"{r['retried']} lost {r['lost_turns']} dup {r['duplicated_turns']}+{r['duplicated_turns_any_file']} "
                  f"double grants {r['double_grants']} recover {r['recover_s']} s {r['failure_reasons']} "
                  f"problems {r['problems']}", flush=True)
            out.write_text(json.dumps({"machine": machine(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "stack_env": {k: v for k, v in stack.env.items() if k.startswith("CROSSTALK_")
                                                     and "PORT" not in k},
                                       "runs": rows}, indent=2, ensure_ascii=False, default=str))
    except BaseException:
        stack.dump_logs()
        raise
    finally:
        stack.cleanup()
        subprocess.run(["cp", "-a", str(data), str(workdir / "data-kept")], check=False)  # for a post-mortem
        subprocess.run(["umount", "-l", str(data)], check=False)
    print(table(rows))
    print(f"report: {out.relative_to(ROOT)}")
    if any(r["problems"] for r in rows):
        raise SystemExit("chaos: a fault lost or duplicated something, or a batch did not end: see the report")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
