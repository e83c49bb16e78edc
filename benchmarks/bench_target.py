"""Target benchmark: crosstalk's customer against examples/target_agent, many conversations at once.

    python benchmarks/bench_target.py                        # 100 conversations at concurrency 50, 6 turns
    python benchmarks/bench_target.py --runs 20x10 --label small

(from the repo root with ``PYTHONPATH=.:tests``, as ``./ct bench`` sets it.)

Each run brings up a fresh stack (``just up`` on free ports), starts the example agent as its own
worker processes (``--target-workers``, each reporting full at ``--target-jobs`` jobs), sends one
``batch.start`` with ``target_agent`` and measures from sources that could show it broken:

* completed / failed and their reasons (the batch's event log), wall time, conversations/min;
* the concurrency the target really ran: rooms holding the target agent at once, polled from
  livekit-server (``list_rooms`` / ``list_participants``), next to LiveKit Simulations' published
  caps (15 simulations at once per run, 30 per project);
* every stored turn (the ``.jsonl`` files) against its source: the customer's against what the
  scripted model served for that conversation (``CROSSTALK_MODEL_SERVED_LOG``), the target's against
  what the target itself logged it said in that room (``ACME_JOB_LOG``): lost, altered, duplicated,
  misordered; the scenario ``userdata`` the target logged from ``simulation_context()``;
* the room audit in ``batch.json`` (livekit-server's webhooks joined with the grant log);
* dispatch-to-joined (both sides in the room) and the target's reply time as the room saw it;
* CPU seconds (crosstalk's stack and the target's processes) and the load average before and after.
Writes benchmarks/results/target-<label>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nats
import psutil
from e2e.stack import running_stack
from livekit import api
from support.target import Target

from benchmarks.bench_batch import (
    RESULTS,
    ROOT,
    ProcSampler,
    check_transcripts,
    collect,
    machine,
    quantiles,
    read_served,
    wait_finished,
)
from shared.rooms import room_name

LIVEKIT_CAPS = {"per_run": 15, "per_project": 30}
USERDATA = {"account_id": "ACME-4417", "holder": "राज शर्मा"}


def scenario_dir(tmp: Path) -> Path:
    """en-account-help with a ``userdata`` for the target to see (a scenario of the benchmark's own)."""
    import msgspec

    from shared.scenarios import get

    sc = msgspec.to_builtins(get("en-account-help"))
    sc.update(id="bench-target", userdata=USERDATA, tags={"suite": "bench-target"})
    folder = tmp / "scenarios"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench-target.json").write_text(json.dumps(sc, ensure_ascii=False), encoding="utf-8")
    return folder


class RoomPoller:
    """livekit-server's own view, polled: how many of the batch's rooms hold the target agent at once."""

    def __init__(self, url: str, key: str, secret: str, prefix: str, agent: str, interval: float = 2.0) -> None:
        self.args = (url.replace("ws", "http", 1), key, secret)
        self.prefix, self.agent, self.interval = prefix, agent, interval
        self.peak_target = self.peak_both = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        lk = api.LiveKitAPI(*self.args)
        try:
            while not self._stop.is_set():
                rooms = [r.name for r in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms
                         if r.name.startswith(self.prefix)]
                target = both = 0
                for name in rooms:
                    try:
                        ps = (await lk.room.list_participants(api.ListParticipantsRequest(room=name))).participants
                    except api.TwirpError:
                        continue  # deleted meanwhile
                    has_target = any(p.kind == api.ParticipantInfo.Kind.AGENT and
                                     p.attributes.get("lk.agent.name") == self.agent for p in ps)
                    has_customer = any("lk.simulator" in p.attributes for p in ps)
                    target += has_target
                    both += has_target and has_customer
                self.peak_target, self.peak_both = max(self.peak_target, target), max(self.peak_both, both)
                self.samples += 1
                await asyncio.sleep(self.interval)
        finally:
            await lk.aclose()

    def __enter__(self) -> RoomPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def check(data_dir: Path, batch_id: str, settled: list[Any], served: dict[str, dict[str, list[str]]],
          targets: list[Target]) -> dict[str, Any]:
    """Stored turns against their sources; the room audit; what the target saw of the scenario."""
    said: dict[str, list[str]] = {}
    seen: dict[str, Any] = {}
    for t in targets:
        for e in t.events("reply"):
            said.setdefault(e["room"], []).append(e["text"])
        for e in t.events("job"):
            seen[e["room"]] = (e.get("simulation") or {}).get("userdata")
    doc = json.loads((data_dir / "batches" / batch_id / "batch.json").read_bytes())
    final = [s for s in settled if not s.retry and s.outcome == "completed"]
    # bench_batch's check, with each role's source: the customer's served log, the target's own log
    sources = {key: {"customer": served.get(key, {}).get("customer", []), "support": said.get(room, [])}
               for s in final for key, room in [(f"{batch_id}/{s.conversation_id}/{s.attempt}",
                                                 room_name(s.conversation_id, s.attempt))]}
    integrity = check_transcripts(data_dir, batch_id, settled, sources)
    violations = [v for c in doc["conversations"].values() for v in c.get("violations", [])]
    rooms = {room_name(s.conversation_id, s.attempt) for s in final}
    return {
        **integrity,
        "integrity_sources": "customer turns vs the scripted model's served log; target turns vs the target's own log",
        "target_saw_userdata": sum(seen.get(r) == USERDATA for r in rooms),
        "room_audit_violations": len(violations),
        "target_identities_recorded": sum(1 for c in doc["conversations"].values() if c.get("target_identity")),
        "batch_json_target_agent": doc.get("target_agent"),
    }


def run_one(conversations: int, concurrency: int, turns: int, target_workers: int, target_jobs: int,
            tmp: Path, keep: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    batch_id = f"bench-target-{conversations}x{concurrency}"
    agent = "acme-support"
    workdir = Path(tempfile.mkdtemp(prefix=f"{batch_id}-", dir=tmp))
    served_log = workdir / "model-served.jsonl"
    overrides = {"CROSSTALK_MAX_CONCURRENCY": str(max(concurrency, 200)), "CROSSTALK_WORKER_MAX_JOBS": "20",
                 # one crosstalk session (the customer) per conversation, plus a spare worker
                 "CROSSTALK_WORKERS": str(-(-concurrency // 20) + 1),
                 "CROSSTALK_SCENARIO_DIR": str(scenario_dir(workdir)), "CROSSTALK_MODEL_SERVED_LOG": str(served_log),
                 **(env or {})}
    load_before = os.getloadavg()
    with running_stack(workdir, **overrides) as stack:
        targets = [Target(stack, workdir, agent, max_jobs=target_jobs, log_name=f"{agent}-{i}")
                   for i in range(target_workers)]
        try:
            time.sleep(3)  # crosstalk's workers registered
            target_procs = [psutil.Process(t.proc.pid) for t in targets]
            target_cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in target_procs)
            cfg = stack.config()
            with ProcSampler(stack) as sampler, RoomPoller(stack.livekit_url, cfg.livekit_key,
                                                           cfg.settings.livekit_api_secret, batch_id, agent) as poll:
                t0 = time.time()

                async def start() -> None:
                    nc = await nats.connect(stack.nats_url)
                    body = {"batch_id": batch_id, "conversations": conversations, "concurrency": concurrency,
                            "max_turns": turns, "scenario": "bench-target", "target_agent": agent}
                    reply = await nc.request("batch.start", json.dumps(body).encode(), timeout=30)
                    assert json.loads(reply.data)["accepted"], reply.data
                    await nc.drain()

                asyncio.run(start())
                finished = asyncio.run(wait_finished(stack.nats_url, batch_id, timeout=3600))
                wall = time.time() - t0
            target_cpu = sum(p.cpu_times().user + p.cpu_times().system for p in target_procs) - target_cpu0
            events = asyncio.run(collect(stack.nats_url, batch_id))
            time.sleep(2)  # the sink's last batch.json write
            integrity = check(stack.data_dir, batch_id, events["settled"], read_served(served_log), targets)
        finally:
            for t in targets:
                t.stop()
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    reasons: dict[str, int] = {}
    retried: dict[str, int] = {}
    for s in events["settled"]:
        if s.outcome == "failed":
            tally = retried if s.retry else reasons
            tally[s.reason.split(":", 1)[0]] = tally.get(s.reason.split(":", 1)[0], 0) + 1
    support = [t for t in events["turns"] if t.role == "support"]
    return {
        "batch_id": batch_id, "conversations": conversations, "concurrency": concurrency, "max_turns": turns,
        "target_agent": agent, "target_worker_processes": target_workers, "target_jobs_per_worker": target_jobs,
        "stack_env": {k: v for k, v in overrides.items() if k.startswith("CROSSTALK_") and "DIR" not in k
                      and "LOG" not in k},
        "completed": finished.completed, "failed": finished.failed, "failure_reasons": reasons,
        "retried_attempt_reasons": retried,
        "attempts": len(events["settled"]), "wall_s": round(wall, 2),
        "conversations_per_min": round(finished.completed / wall * 60, 2),
        "peak_rooms_with_target_lk_view": poll.peak_target, "peak_rooms_with_customer_and_target_lk_view": poll.peak_both,
        "lk_polls": poll.samples, "livekit_simulations_caps": LIVEKIT_CAPS,
        "peak_vs_livekit_per_run_cap": round(poll.peak_both / LIVEKIT_CAPS["per_run"], 2),
        "dispatch_to_join_s": quantiles([j.join_seconds for j in events["joined"]]),
        "target_reply_first_text_s": quantiles([t.first_token_s for t in support if t.first_token_s is not None]),
        "target_reply_total_s": quantiles([t.ended_at - t.started_at for t in support]),
        "turn_events": len(events["turns"]),
        "cpu_s_crosstalk": round(sampler.cpu_end - sampler.cpu_start, 2),
        "cpu_s_target": round(target_cpu, 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        **integrity,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="100x50", help="comma list of CONVERSATIONSxCONCURRENCY")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--target-workers", type=int, default=2, help="example agent worker processes")
    ap.add_argument("--target-jobs", type=int, default=30, help="jobs at which each target worker reports full")
    ap.add_argument("--label", default="100-c50")
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                    help="extra stack setting, e.g. CROSSTALK_MAX_JOINING=50 (repeatable)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--tmp", default=str(ROOT / "run" / "bench"))
    args = ap.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.runs.split(","):
        n, c = (int(x) for x in spec.split("x"))
        r = run_one(n, c, args.turns, args.target_workers, args.target_jobs, tmp, args.keep,
                    dict(kv.split("=", 1) for kv in args.env))
        print(json.dumps(r, indent=2, ensure_ascii=False), flush=True)
        results.append(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"target-{args.label}.json"
    out.write_text(json.dumps({"machine": machine(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "runs": results}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    bad = any(r["lost_turns"] or r["altered_turns"] or r["duplicated_turns"] or r["misordered_conversations"]
              or r["room_audit_violations"] for r in results)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
