"""Batch benchmark: 200-conversation batches on the local stack with the scripted model.

    python benchmarks/bench_batch.py                       # 200 @ 50 and 200 @ 100, 6 turns, thread executor
    python benchmarks/bench_batch.py --runs 20x10          # a small one
    python benchmarks/bench_batch.py --executors thread,process --runs 40x20   # executor comparison

(from the repo root with ``PYTHONPATH=.:tests``, as ``./ct bench`` sets it: the stack helper is
tests/e2e/stack.py).

Each run brings up a fresh stack (``just up`` on free ports, tests/e2e/stack.py), sends one
``batch.start``, and measures from the real event log and the real processes: completed/failed,
wall time, conversations/min, dispatch-to-both-joined p50/p95/p99 (ConversationJoined), room audit
(livekit-server's webhooks joined with the grant log: two of one role, no grant, third agent), role
grant p50/p99 (allocator histogram), turn latency p50/p99 (TurnRecorded), CPU seconds per
conversation (all stack processes), peak worker RSS and RSS per concurrent agent session, and
anything lost, altered or duplicated (every stored turn against the completion the scripted model
served for it, from its served log; must be 0). With ``lk`` installed it
also runs LiveKit's own ``lk perf agent-load-test`` on the same livekit-server and prints its
join delay next to ours. Writes benchmarks/results/batch-<label>.json and a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
import psutil
from e2e.stack import running_stack

from shared import bus, subjects
from shared.contracts import (
    BatchEvent,
    BatchFinished,
    ConversationDispatched,
    ConversationEvent,
    ConversationJoined,
    ConversationSettled,
    TurnRecorded,
    decode_event,
)
from shared.rooms import room_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(round(p * (len(v) - 1))))], 4)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "n": len(v)}


def histogram_quantile(metrics_text: str, name: str, qs: tuple[float, ...] = (0.5, 0.99)) -> dict[str, float | None]:
    """Quantiles from a Prometheus histogram's cumulative buckets (linear within a bucket)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    out: dict[str, float | None] = {}
    total = buckets[-1][1] if buckets else 0.0
    for qv in qs:
        key = f"p{int(qv * 100)}"
        if not total:
            out[key] = None
            continue
        rank, prev_le, prev_c = qv * total, 0.0, 0.0
        for le, c in buckets:
            if c >= rank:
                if le == float("inf"):
                    out[key] = prev_le
                else:
                    out[key] = round(prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-9)), 5)
                break
            prev_le, prev_c = le, c
    out["n"] = total
    return out


class ProcSampler:
    """Samples CPU and RSS of every process of a stack (by its tag) while a batch runs."""

    def __init__(self, stack: Any, interval: float = 0.5) -> None:
        self.stack, self.interval = stack, interval
        self.peak_worker_rss = 0
        self.idle_worker_rss = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _workers(self) -> list[psutil.Process]:
        """Worker processes and their children (watchdog, job processes), each once."""
        out: dict[int, psutil.Process] = {}
        for p in self.stack.processes():
            try:  # a worker can exit (or be killed by its watchdog) between the listing and here
                if "-m worker" in " ".join(p.cmdline()):
                    out[p.pid] = p
                    out.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.Error:
                continue
        return list(out.values())

    def worker_rss(self) -> int:
        total = 0
        for p in self._workers():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_seconds(self) -> float:
        for p in self.stack.processes():
            try:
                procs = [p, *p.children(recursive=True)]
            except psutil.Error:
                continue
            for c in procs:
                try:
                    t = c.cpu_times()
                    self.cpu[c.pid] = t.user + t.system
                except psutil.Error:
                    pass
        return sum(self.cpu.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_worker_rss = max(self.peak_worker_rss, self.worker_rss())
            self.cpu_seconds()
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcSampler:
        self.idle_worker_rss = self.worker_rss()
        self.cpu_start = self.cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_end = self.cpu_seconds()

    def worker_sessions(self) -> list[dict[str, float]]:
        """Each worker process's own view: announced capacity and the most sessions it ran at once.

        Read from every worker's /metrics (found among the ports it listens on), so the figure comes
        from the workers, not from the dispatcher's admission decisions.
        """
        out: list[dict[str, float]] = []
        for p in self._workers():
            try:
                if "-m worker" not in " ".join(p.cmdline()):
                    continue
                ports = {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                continue
            for port in sorted(ports):
                try:
                    text = scrape(str(port))
                except Exception:
                    continue
                values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                          if line.startswith(("crosstalk_worker_capacity_sessions ", "crosstalk_worker_peak_active_jobs "))}
                if values:
                    out.append({"pid": p.pid, "capacity": values.get("crosstalk_worker_capacity_sessions", 0.0),
                                "peak_active": values.get("crosstalk_worker_peak_active_jobs", 0.0)})
                    break
        return out


async def collect(nats_url: str, batch_id: str) -> dict[str, Any]:
    """Everything the event log says about the batch."""
    nc = await nats.connect(nats_url.split(","))  # a cluster: every node
    js = nc.jetstream()
    out: dict[str, Any] = {"joined": [], "settled": [], "finished": None, "turns": [], "dispatched": {}}
    for ev in await bus.replay(js, subjects.batch_events(batch_id), BatchEvent):
        if isinstance(ev, ConversationDispatched):
            out["dispatched"][ev.room] = ev.at
        elif isinstance(ev, ConversationJoined):
            out["joined"].append(ev)
        elif isinstance(ev, ConversationSettled):
            out["settled"].append(ev)
        elif isinstance(ev, BatchFinished):
            out["finished"] = ev
    turns = await bus.replay(js, f"conv.{batch_id}.*.turn", ConversationEvent)
    out["turns"] = [ev for ev in turns if isinstance(ev, TurnRecorded)]
    await nc.drain()
    return out


async def wait_finished(nats_url: str, batch_id: str, timeout: float) -> BatchFinished:
    nc = await nats.connect(nats_url.split(","))  # a cluster: every node
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                msg = await js.get_last_msg("BATCH_EVENTS", subjects.batch_events(batch_id))
                ev = decode_event(msg.data, BatchEvent)
                if isinstance(ev, BatchFinished):
                    return ev
            except Exception:
                pass
            await asyncio.sleep(0.5)
    finally:
        await nc.drain()
    raise TimeoutError(f"batch {batch_id} did not finish within {timeout}s")


def check_roles(data_dir: Path, batch_id: str, settled: list[ConversationSettled],
                timeout: float = 120) -> dict[str, Any]:
    """Every room as livekit-server saw it (its webhooks), joined with the allocator's grants: the
    sink's room audit in batch.json (services/sink/audit.py), read once it settled (every final room
    reported finished, every participant gone). Counts rooms with two agents holding one role at
    once, agent participants without a grant, rooms with a third agent, and completed conversations
    whose room did not hold exactly one customer and one support agent participant."""
    path = data_dir / "batches" / batch_id / "batch.json"
    deadline = time.monotonic() + timeout
    while True:
        convs = json.loads(path.read_bytes()).get("conversations", {}) if path.exists() else {}
        unsettled = [cid for cid, c in convs.items()
                     if not any(r["room"] == room_name(cid, c.get("attempts", 0)) and r.get("finished_at")
                                for r in c.get("rooms", []))
                     or not all(p.get("left_at") for p in c.get("participants", []))]
        if convs and not unsettled or time.monotonic() > deadline:
            break
        time.sleep(1)
    violations = [v for c in convs.values() for v in c.get("violations", [])]
    completed = [(s.conversation_id, room_name(s.conversation_id, s.attempt)) for s in settled
                 if s.outcome == "completed"]

    def one_of_each(cid: str, room: str) -> bool:
        agents = [p for p in convs.get(cid, {}).get("participants", []) if p["room"] == room and p["kind"] == "agent"]
        return sorted(p["role"] or "" for p in agents) == ["customer", "support"] and len(
            {p["identity"] for p in agents}) == 2

    return {
        "roles_source": "room audit: livekit-server webhooks joined with the allocator's grant log (batch.json)",
        "rooms_audited": len({r["room"] for c in convs.values() for r in c.get("rooms", [])}),
        "audit_unsettled_conversations": len(unsettled),
        "rooms_with_two_agents_of_one_role": len({v["room"] for v in violations if v["kind"] == "two_of_one_role"}),
        "agent_participants_without_a_grant": sum(v["kind"] == "no_grant" for v in violations),
        "rooms_with_a_third_agent": sum(v["kind"] == "third_agent" for v in violations),
        "completed_rooms_without_one_of_each_role": sum(not one_of_each(cid, room) for cid, room in completed),
    }


def read_served(path: Path) -> dict[str, dict[str, list[str]]]:
    """The scripted model's served log: ``<batch>/<conversation>/<attempt>`` -> role -> texts, in serving order."""
    served: dict[str, dict[str, list[str]]] = {}
    if path.exists():
        for raw in path.read_bytes().splitlines():
            line = json.loads(raw)
            if line.get("conversation"):
                served.setdefault(line["conversation"], {}).setdefault(line["role"], []).append(line["text"])
    return served


def check_transcripts(data_dir: Path, batch_id: str, settled: list[ConversationSettled],
                      served: dict[str, dict[str, list[str]]]) -> dict[str, int]:
    """Every stored turn against what the model actually served, from the files on disk.

    For each completed conversation (its final attempt), turn ``t`` was spoken by the customer when
    ``t`` is even, the support agent when odd, and must hold the ``t // 2``-th completion the model
    served to that role in that attempt, byte for byte. ``lost``: a turn of the conversation missing
    from the file; ``altered``: a stored text that differs from what was served; ``duplicated``: a
    turn index twice in the file; ``misordered``: a file whose turn indexes are not 0, 1, 2, ...
    None of these can be decided by the sink's own bookkeeping: they read the file and the model's log.
    """
    final = {s.conversation_id: s for s in settled if not s.retry}
    lost = altered = duplicated = misordered = stored = 0
    for cid, s in final.items():
        if s.outcome != "completed":
            continue
        path = data_dir / "batches" / batch_id / "conversations" / f"{cid}.jsonl"
        lines = [json.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []
        stored += len(lines)
        got = [x["turn"] for x in lines]
        duplicated += len(got) - len(set(got))
        misordered += int(got != list(range(len(got))))
        by_turn = {x["turn"]: x for x in lines if x.get("attempt") == s.attempt}
        said = served.get(f"{batch_id}/{cid}/{s.attempt}", {})
        for t in range(s.turns):
            role = "customer" if t % 2 == 0 else "support"
            texts = said.get(role, [])
            line = by_turn.get(t)
            if line is None:
                lost += 1
            elif line["role"] != role or t // 2 >= len(texts) or line["text"] != texts[t // 2]:
                altered += 1
    return {"stored_turns": stored, "lost_turns": lost, "altered_turns": altered, "duplicated_turns": duplicated,
            "misordered_conversations": misordered}


PHASES = ("dispatch_to_job", "nats", "role", "connected", "peer", "session", "ready")


def join_phases(logs_dir: Path, dispatched: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Where the join time goes, per agent job: from the workers' ``ready announced`` log lines.

    ``dispatch_to_job``: the dispatcher's CreateDispatch until the job's entrypoint runs (livekit-server
    assigning the job, the worker accepting it, a runner thread starting it); then each step of
    worker/job.py: NATS connected, role granted, room connected, peer agent seen, AgentSession
    started, ready announced. ``ts`` is wall time at ``ready``, so the entrypoint ran at ts - ready_s.
    """
    steps: dict[str, list[float]] = {p: [] for p in PHASES}
    for path in sorted(logs_dir.glob("worker-*.log")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"ready announced"' not in line:
                continue
            try:
                rec = json.loads(line)
                at = dispatched[rec["room"]]
                marks = [rec[f"{p}_s"] for p in PHASES[1:]]
            except (ValueError, KeyError):
                continue
            steps["dispatch_to_job"].append(rec["ts"] - rec["ready_s"] - at)
            prev = 0.0
            for phase, mark in zip(PHASES[1:], marks, strict=True):
                steps[phase].append(mark - prev)
                prev = mark
    return {p: quantiles(v) for p, v in steps.items()}


def scrape(port: str) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def lk_run(stack: Any, rooms: int, agent_name: str, start_agent: bool = True) -> dict[str, Any]:
    try:
        from benchmarks.lk_compare import run_lk_agent_load_test

        return run_lk_agent_load_test(stack.livekit_url, "devkey", "secret", rooms=rooms, duration_s=None,
                                      agent_name=agent_name, start_agent=start_agent)
    except Exception as exc:  # lk missing or failed: say so in the report
        return {"error": f"{type(exc).__name__}: {exc}"}


def start_echo(stack: Any, agent_name: str) -> Any:
    """The echo agent for the lk run during the batch, registered before the batch loads the machine."""
    try:
        from benchmarks.lk_compare import find_lk, start_echo_agent

        find_lk()
        return start_echo_agent(stack.livekit_url, "devkey", "secret", agent_name, announce=True,
                                log_path=stack.tmp / f"{agent_name}.log")
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_one(conversations: int, concurrency: int, turns: int, executor: str, jobs_per_worker: int,
            lk_rooms: int, tmp: Path, keep: bool = False, env: dict[str, str] | None = None,
            lk_under_load: int = 0, stack_sizing: bool = False) -> dict[str, Any]:
    batch_id = f"bench-{conversations}x{concurrency}-{executor}"
    overrides = {
        "CROSSTALK_WORKER_EXECUTOR": executor,
        "CROSSTALK_MAX_CONCURRENCY": str(max(concurrency, 200)),
        "CROSSTALK_WORKER_MAX_JOBS": str(jobs_per_worker),
        **(env or {}),
    }
    if jobs_per_worker and not stack_sizing:
        # enough worker processes for 2 agent sessions per conversation in flight, plus one spare
        overrides["CROSSTALK_WORKERS"] = str(-(-2 * concurrency // jobs_per_worker) + 1)
    if stack_sizing:
        batch_id += "-sized"
        overrides["CROSSTALK_WORKERS"] = ""  # unset: the stack sizes its workers to the machine, as `./ct up` does
    if (lk_rooms or lk_under_load) and shutil.which("lk", path=str(ROOT / ".tools" / "bin")):
        # lk joins rooms it never created; our dispatcher creates its rooms explicitly either way
        overrides["LIVEKIT_ROOM_AUTO_CREATE"] = "true"
    workdir = Path(tempfile.mkdtemp(prefix=f"{batch_id}-", dir=tmp))
    served_log = workdir / "model-served.jsonl"  # what the model really handed each agent to say
    overrides["CROSSTALK_MODEL_SERVED_LOG"] = str(served_log)
    with running_stack(workdir, **overrides) as stack:
        time.sleep(3)  # workers registered
        with ProcSampler(stack) as sampler:
            t0 = time.time()

            async def start() -> None:
                nc = await nats.connect(stack.nats_url)
                body = {"batch_id": batch_id, "conversations": conversations, "concurrency": concurrency,
                        "max_turns": turns}
                reply = await nc.request("batch.start", json.dumps(body).encode(), timeout=30)
                assert json.loads(reply.data)["accepted"], reply.data
                await nc.drain()

            under_load: dict[str, Any] = {}
            lk_thread = None
            echo = start_echo(stack, "lk-echo-under-load") if lk_under_load else None
            if isinstance(echo, dict):
                under_load, echo = echo, None
            asyncio.run(start())
            if echo is not None:
                # LiveKit's own join measurement while our batch loads the same machine and server
                def lk_during() -> None:
                    under_load.update(lk_run(stack, lk_under_load, "lk-echo-under-load", start_agent=False))

                lk_thread = threading.Thread(target=lk_during, daemon=True)
                lk_thread.start()
            finished = asyncio.run(wait_finished(stack.nats_url, batch_id, timeout=3600))
            wall = time.time() - t0
            if lk_thread is not None:
                lk_thread.join()
            if echo is not None:
                from support.servers import terminate

                from benchmarks.lk_compare import STOP_TIMEOUT_S

                terminate(echo, STOP_TIMEOUT_S)
        worker_sessions = sampler.worker_sessions()
        events = asyncio.run(collect(stack.nats_url, batch_id))
        alloc_metrics = scrape(stack.env["CROSSTALK_ALLOCATOR_METRICS_PORT"])
        integrity = check_transcripts(stack.data_dir, batch_id, events["settled"], read_served(served_log))
        phases = join_phases(stack.run_dir / "logs", events["dispatched"])
        roles = check_roles(stack.data_dir, batch_id, events["settled"])
        final = [s for s in events["settled"] if not s.retry]
        reasons: dict[str, int] = {}
        for s in final:
            if s.outcome == "failed":
                reasons[s.reason] = reasons.get(s.reason, 0) + 1
        lk_result = lk_run(stack, lk_rooms, "lk-echo") if lk_rooms else None
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    sessions = 2 * min(concurrency, int(sum(w["capacity"] for w in worker_sessions) // 2) or concurrency)
    cpu = sampler.cpu_end - sampler.cpu_start
    join = quantiles([j.join_seconds for j in events["joined"]])
    report = {
        "batch_id": batch_id,
        "conversations": conversations,
        "concurrency": concurrency,
        "max_turns": turns,
        "executor": executor,
        "stack_env": {k: v for k, v in overrides.items() if "SECRET" not in k and "KEY" not in k},
        "worker_processes": len(worker_sessions),
        "stack_sizing": stack_sizing,
        "worker_sessions": worker_sessions,
        "sessions_capacity": sum(w["capacity"] for w in worker_sessions),
        "workers_over_capacity": sum(1 for w in worker_sessions if w["peak_active"] > w["capacity"]),
        "jobs_per_worker": jobs_per_worker,
        "completed": finished.completed,
        "failed": finished.failed,
        "failure_reasons": reasons,
        "attempts": len(events["settled"]),
        "wall_s": round(wall, 2),
        "conversations_per_min": round(finished.completed / wall * 60, 2),
        "dispatch_to_join_s": join,
        "join_phases_s": phases,
        "role_grant_s": histogram_quantile(alloc_metrics, "crosstalk_role_request_seconds"),
        "turn_first_token_s": quantiles([t.first_token_s for t in events["turns"] if t.first_token_s is not None]),
        "turn_total_s": quantiles([t.total_s for t in events["turns"] if t.total_s is not None]),
        "turn_events": len(events["turns"]),
        "cpu_s_total": round(cpu, 2),
        "cpu_s_per_conversation": round(cpu / max(conversations, 1), 3),
        "worker_rss_idle_mb": round(sampler.idle_worker_rss / 2**20, 1),
        "worker_rss_peak_mb": round(sampler.peak_worker_rss / 2**20, 1),
        "rss_per_session_mb": round((sampler.peak_worker_rss - sampler.idle_worker_rss) / 2**20 / sessions, 2),
        **integrity,
        **roles,
        "lk_agent_load_test": lk_result,
        "lk_agent_load_test_under_batch": under_load or None,
    }
    for res, key in ((lk_result, "join_p99_ratio_ours_to_lk"), (under_load, "join_p99_ratio_ours_to_lk_under_batch")):
        if res and "join_delay_s" in res and join["p99"]:
            theirs = res["join_delay_s"].get("p99")
            report[key] = round(join["p99"] / theirs, 2) if theirs else None
    return report


def machine() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"),
    }


def summary(r: dict[str, Any]) -> str:
    j, g, t = r["dispatch_to_join_s"], r["role_grant_s"], r["turn_total_s"]
    lines = [
        f"{r['conversations']} conversations @ concurrency {r['concurrency']} ({r['executor']}, {r['worker_processes']} worker proc, "
        f"{r['sessions_capacity']:.0f} sessions announced, peak per worker "
        f"{[int(w['peak_active']) for w in r['worker_sessions']]}, over capacity {r['workers_over_capacity']}): "
        f"{r['completed']} completed, {r['failed']} failed {r['failure_reasons'] or ''} in {r['wall_s']} s "
        f"= {r['conversations_per_min']} conv/min",
        f"  dispatch->both joined p50/p95/p99 = {j['p50']}/{j['p95']}/{j['p99']} s; role grant p50/p99 = {g.get('p50')}/{g.get('p99')} s; "
        f"turn p50/p99 = {t['p50']}/{t['p99']} s",
        f"  CPU {r['cpu_s_per_conversation']} s/conversation; worker RSS idle {r['worker_rss_idle_mb']} MB, peak "
        f"{r['worker_rss_peak_mb']} MB, {r['rss_per_session_mb']} MB per agent session; of {r['stored_turns']} stored "
        f"turns (checked against the model's served log): lost {r['lost_turns']}, altered {r['altered_turns']}, "
        f"duplicated {r['duplicated_turns']}, misordered {r['misordered_conversations']}",
        f"  room audit (livekit-server's webhooks + grant log, {r.get('rooms_audited')} rooms): two agents of one "
        f"role {r.get('rooms_with_two_agents_of_one_role')}, agent without a grant "
        f"{r.get('agent_participants_without_a_grant')}, third agent {r.get('rooms_with_a_third_agent')}, completed "
        f"without one of each {r.get('completed_rooms_without_one_of_each_role')}, unsettled "
        f"{r.get('audit_unsettled_conversations')}",
    ]
    ph = r.get("join_phases_s") or {}
    if ph:
        lines.append("  join phases p50/p99 (s): " + ", ".join(
            f"{p} {ph[p]['p50']:.2f}/{ph[p]['p99']:.2f}" for p in PHASES if ph.get(p, {}).get("n")))
    for key, ratio, when in (
            ("lk_agent_load_test", "join_p99_ratio_ours_to_lk", "after the batch, idle machine"),
            ("lk_agent_load_test_under_batch", "join_p99_ratio_ours_to_lk_under_batch", "during the batch")):
        lk = r.get(key)
        if not lk:
            continue
        if "join_delay_s" in lk:
            d = lk["join_delay_s"]
            lines.append(f"  lk perf agent-load-test ({lk.get('rooms')} rooms, {when}): join delay p50/p95/p99 = "
                         f"{d.get('p50')}/{d.get('p95')}/{d.get('p99')} s; ours/lk p99 = {r.get(ratio)}")
        else:
            lines.append(f"  lk perf agent-load-test ({when}) unavailable: {lk.get('error')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="200x50,200x100", help="comma list of CONVERSATIONSxCONCURRENCY")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--executors", default="thread")
    ap.add_argument("--jobs-per-worker", type=int, default=16,
                    help="CROSSTALK_WORKER_MAX_JOBS; worker processes = 2*concurrency/this + 1")
    ap.add_argument("--lk-rooms", type=int, default=-1, help="rooms for lk perf (default: the concurrency; 0 = skip)")
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                    help="extra environment for the stack (repeatable), e.g. CROSSTALK_MAX_JOINING=20")
    ap.add_argument("--lk-under-load", type=int, default=20, metavar="ROOMS",
                    help="also run lk perf for this many rooms while the batch runs (0 = skip)")
    ap.add_argument("--stack-sizing", action="store_true",
                    help="run on the stack's own worker sizing (what `./ct up` starts), not 2*concurrency sessions")
    ap.add_argument("--label", default="")
    ap.add_argument("--keep", action="store_true", help="keep each run's stack dir (logs, data)")
    ap.add_argument("--tmp", default=str(ROOT / "run" / "bench"))
    args = ap.parse_args()
    env: dict[str, str] = {}
    for item in args.env:
        var, sep, value = item.partition("=")
        if not sep or not var.isidentifier():
            ap.error(f"--env: expected VAR=VALUE, got {item!r}")
        env[var] = value
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    reports: list[dict[str, Any]] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for executor in args.executors.split(","):
        for spec in args.runs.split(","):
            n, c = (int(x) for x in spec.lower().split("x"))
            lk_rooms = c if args.lk_rooms < 0 else args.lk_rooms
            r = run_one(n, c, args.turns, executor, args.jobs_per_worker, lk_rooms, Path(args.tmp), args.keep, env,
                       args.lk_under_load, args.stack_sizing)
            print(summary(r), flush=True)
            reports.append(r)
            # written after every run, so a long series keeps what it measured
            label = args.label or "-".join(f"{x['conversations']}x{x['concurrency']}-{x['executor']}" for x in reports)
            out = RESULTS / f"batch-{label}.json"
            out.write_text(json.dumps({"machine": machine(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "runs": reports}, indent=2, ensure_ascii=False, default=str))
            print(f"report: {out.relative_to(ROOT)}", flush=True)
    bad = [r for r in reports if r["lost_turns"] or r["altered_turns"] or r["duplicated_turns"]
           or r["misordered_conversations"]
           or r["rooms_with_two_agents_of_one_role"] or r["completed_rooms_without_one_of_each_role"]
           or r["agent_participants_without_a_grant"] or r["rooms_with_a_third_agent"]
           or r["audit_unsettled_conversations"] or r["workers_over_capacity"]]
    if bad:
        raise SystemExit("lost or duplicated turns, or a room-audit violation (two of one role, agent without "
                         "a grant, third agent, room not one of each): see the report")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

