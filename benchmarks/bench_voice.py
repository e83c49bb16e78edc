"""Voice benchmark: voice batches on the local stack (offline speech), the same batch in text mode beside each.

    PYTHONPATH=.:tests python benchmarks/bench_voice.py                  # 10 and 20, then search up from 20
    PYTHONPATH=.:tests python benchmarks/bench_voice.py --runs 2 --no-search --label smoke   # a small one

Each run brings up a fresh stack (``just up`` on free ports, speech service included) and sends one
voice ``batch.start`` of ``concurrency`` conversations (``--per-run`` times as many with
``--per-run``), then the same batch in text mode on another fresh stack. Measured from what
could show it broken: the recordings on disk (heard latency p50/p95/p99, overlap, awkward
silences, unanswered turns, false interruptions, time to first audio, WER: the sink's metrics
from the stereo files in ``batch.json``; the benchmark re-reads the files), the real processes
(CPU seconds of every stack process, per process kind, over the batch; worker RSS peak minus idle
per agent session), and conversation-minutes from the recordings' durations.

``--search`` (default on) then raises the concurrency from the largest run that held (every
conversation completed, heard-latency p95 < 2 s) in ``--step`` steps until one does not hold (or,
when none held, halves it from the smallest run until one holds), and reports the largest that
held and what limited the next one. ``--profile`` samples the worker
processes with py-spy during the first voice run and keeps the top frames. The machine's load
average before and after each run is recorded: a shared machine makes every figure pessimistic.
Writes benchmarks/results/voice-<label>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from bench_batch import ROOT, ProcSampler, machine, quantiles, wait_finished
from e2e.stack import running_stack

from services.sink.core import voice as vm
from shared import config

RESULTS = ROOT / "benchmarks" / "results"
P95_LIMIT_S = 2.0


def cpu_by_kind(sampler: ProcSampler, start: dict[int, float], stack: Any) -> dict[str, float]:
    """CPU seconds over the batch per process kind (worker, speech, livekit-server, ...)."""
    kinds: dict[int, str] = {}
    for p in stack.processes():
        try:
            cmd = " ".join(p.cmdline())
            kind = next((k for k in ("worker", "speech", "model", "sink", "dispatcher", "allocator", "webhook")
                         if f"-m {k}" in cmd or f"services.{k}" in cmd), None) or p.name()
            kinds[p.pid] = kind
            for c in p.children(recursive=True):
                kinds.setdefault(c.pid, kind)
        except Exception:
            continue
    out: dict[str, float] = {}
    for pid, total in sampler.cpu.items():
        kind = kinds.get(pid, "other")
        out[kind] = round(out.get(kind, 0.0) + total - start.get(pid, 0.0), 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile(stack: Any, seconds: int, out: Path) -> dict[str, Any]:
    """py-spy over the worker processes for ``seconds``; the top frames by own samples."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    pids = [p.pid for p in stack.processes() if "-m worker" in " ".join(p.cmdline())]
    frames: dict[str, int] = {}
    areas: dict[str, int] = {}
    total = 0
    for pid in pids:
        raw = out / f"pyspy-{pid}.txt"
        subprocess.run([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "20", "--nonblocking",
                        "-f", "raw", "-o", str(raw)], capture_output=True, timeout=seconds + 120)
        if not raw.exists():
            continue
        for line in raw.read_text(errors="replace").splitlines():
            stack_s, _, count = line.rpartition(" ")
            leaf = stack_s.split(";")[-1] if stack_s else "?"
            frames[leaf] = frames.get(leaf, 0) + int(count)
            total += int(count)
            for part, name in AREAS:
                if part in stack_s:
                    areas[name] = areas.get(name, 0) + int(count)
    top = sorted(frames.items(), key=lambda kv: -kv[1])[:25]
    return {"samples": total, "by_area": {k: round(v / total, 4) for k, v in sorted(areas.items(), key=lambda kv: -kv[1])}
            if total else {},
            "top_own_frames": [{"frame": f, "share": round(n / total, 4)} for f, n in top]}


# where a sample's stack runs, by the code it passes through (a sample may count in several)
AREAS = (("silero", "silero VAD"), ("onnxruntime", "onnxruntime"), ("livekit/rtc", "livekit-rtc (FFI, audio)"),
         ("audio_recognition", "agents: audio recognition"), ("stream_adapter", "agents: STT stream adapter"),
         ("tts/", "agents: TTS"), ("room_io", "agents: room io"), ("recorder.py", "crosstalk: recording tap"),
         ("httpx", "http clients"), ("openai", "openai client"), ("resampl", "resampling"))


def run(mode: str, conversations: int, concurrency: int, turns: int, tmp: Path, env: dict[str, str],
        profile_s: int = 0) -> dict[str, Any]:
    batch_id = f"bv-{mode}-{conversations}x{concurrency}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{batch_id}-", dir=tmp))
    sessions = 2 * concurrency
    overrides = {"CROSSTALK_MAX_CONCURRENCY": str(max(concurrency, 200)),
                 "CROSSTALK_WORKERS": str(-(-sessions // int(env.get("CROSSTALK_WORKER_MAX_JOBS", "16"))) + 1),
                 "CROSSTALK_JOIN_DEADLINE_S": "120", **env}
    load_before = os.getloadavg()
    with running_stack(workdir, **overrides) as stack:
        time.sleep(5)  # workers registered, speech engines warm
        with ProcSampler(stack) as sampler:
            start = dict(sampler.cpu)
            t0 = time.time()

            async def go() -> None:
                nc = await nats.connect(stack.nats_url)
                body = {"batch_id": batch_id, "conversations": conversations, "concurrency": concurrency,
                        "max_turns": turns, "mode": mode}
                reply = await nc.request("batch.start", json.dumps(body).encode(), timeout=30)
                assert json.loads(reply.data)["accepted"], reply.data
                await nc.drain()

            asyncio.run(go())
            spy = profile(stack, profile_s, workdir) if profile_s else None
            finished = asyncio.run(wait_finished(stack.nats_url, batch_id, timeout=3600))
            wall = time.time() - t0
        by_kind = cpu_by_kind(sampler, start, stack)
        folder = stack.data_dir / "batches" / batch_id
        doc = wait_doc(folder, conversations if mode == "voice" else 0)
        turns_total = quantiles([t["total_s"] for f in (folder / "conversations").glob("*.jsonl")
                                 for t in map(json.loads, f.read_text().splitlines()) if t.get("total_s")])
        rec = recordings(folder) if mode == "voice" else {}
    shutil.rmtree(workdir, ignore_errors=True)
    cpu = sampler.cpu_end - sampler.cpu_start
    pacing = config.load({**os.environ, **overrides})
    minutes = rec.get("conversation_minutes") or 0.0
    out: dict[str, Any] = {
        "mode": mode, "conversations": conversations, "concurrency": concurrency, "max_turns": turns,
        "completed": finished.completed, "failed": finished.failed,
        "failure_reasons": sorted({c.get("reason") for c in doc.get("conversations", {}).values()
                                   if c.get("outcome") == "failed"}),
        "wall_s": round(wall, 1), "cpu_s_total": round(cpu, 1), "cpu_s_by_process": by_kind,
        "cpu_s_per_conversation": round(cpu / conversations, 2),
        "worker_rss_idle_mb": round(sampler.idle_worker_rss / 2**20, 1),
        "worker_rss_peak_mb": round(sampler.peak_worker_rss / 2**20, 1),
        "rss_per_session_mb": round((sampler.peak_worker_rss - sampler.idle_worker_rss) / 2**20 / sessions, 2),
        "turn_total_s": turns_total,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "stack_env": overrides,
        # the scripted model's simulated latency, part of every turn's latency (not the pipeline's cost)
        "model_pacing": {"ttft_ms": pacing.model_ttft_ms, "tokens_per_s": pacing.model_tokens_per_s,
                         "vad_min_silence_s": pacing.vad_min_silence_s},
    }
    if mode == "voice":
        out.update({"conversation_minutes": round(minutes, 2),
                    "cpu_s_per_conversation_minute": round(cpu / minutes, 2) if minutes else None,
                    "voice": doc.get("voice"), "from_recordings": rec})
        if spy is not None:
            out["profile"] = spy
    return out


def wait_doc(folder: Path, voiced: int, timeout: float = 120) -> dict[str, Any]:
    """batch.json once final and (voice) with every conversation's recording metrics."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        path = folder / "batch.json"
        doc = json.loads(path.read_bytes()) if path.exists() else {}
        done = sum(1 for c in doc.get("conversations", {}).values() if c.get("voice") or c.get("outcome") == "failed")
        if doc.get("status") in ("completed", "failed") and done >= voiced:
            return doc
        time.sleep(0.5)
    return doc


def recordings(folder: Path) -> dict[str, Any]:
    """Heard latency and conversation-minutes re-measured from the wav files and turn lines on disk."""
    import wave

    import numpy as np

    lat: list[float] = []
    seconds = 0.0
    files = sorted((folder / "recordings").glob("*.wav"))
    for wav in files:
        with wave.open(str(wav)) as w:
            rate, n = w.getframerate(), w.getnframes()
            stereo = np.frombuffer(w.readframes(n), dtype="<i2").reshape(-1, 2)
        seconds += n / rate
        lines = folder / "conversations" / f"{wav.stem}.jsonl"
        turns = [vm.Turn(turn=t["turn"], role=t["role"], text=t["text"], started_at=t["started_at"],
                         audio_start_s=t.get("audio_start_s"), audio_end_s=t.get("audio_end_s"))
                 for t in map(json.loads, lines.read_text().splitlines())] if lines.exists() else []
        lat += vm.heard_latencies(turns)
        del stereo
    return {"files": len(files), "conversation_minutes": round(seconds / 60, 3),
            "heard_latency_s": {k: (round(v, 3) if isinstance(v, float) else v)
                                for k, v in {"p50": vm.percentile(lat, 50), "p95": vm.percentile(lat, 95),
                                             "p99": vm.percentile(lat, 99), "n": len(lat)}.items()}}


def held(r: dict[str, Any]) -> bool:
    p95 = (r.get("from_recordings") or {}).get("heard_latency_s", {}).get("p95")
    return r["failed"] == 0 and p95 is not None and p95 < P95_LIMIT_S


def limit_of(r: dict[str, Any]) -> str:
    if r["failed"]:
        return f"{r['failed']} conversation(s) failed: {r['failure_reasons']}"
    p95 = r["from_recordings"]["heard_latency_s"]["p95"]
    top = next(iter(r["cpu_s_by_process"].items()), ("?", 0))
    return (f"heard-latency p95 {p95} s >= {P95_LIMIT_S} s; CPU {r['cpu_s_total']} s over {r['wall_s']} s wall "
            f"(= {r['cpu_s_total'] / r['wall_s']:.2f} cores of {os.cpu_count()}), most in {top[0]} ({top[1]} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="10,20", help="comma list of concurrencies (conversations = concurrency x --per-run)")
    ap.add_argument("--per-run", type=int, default=1, help="conversations per run = this x concurrency")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--no-search", dest="search", action="store_false")
    ap.add_argument("--step", type=int, default=4)
    ap.add_argument("--search-max", type=int, default=64)
    ap.add_argument("--no-text", dest="text", action="store_false", help="skip the text-mode batch beside each")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS", help="py-spy the workers in the first run")
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE")
    ap.add_argument("--label", default="")
    ap.add_argument("--tmp", default=str(ROOT / "run" / "bench"))
    args = ap.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    label = args.label or time.strftime("%Y%m%d-%H%M")
    out_path = RESULTS / f"voice-{label}.json"

    def one(c: int, first: bool) -> dict[str, Any]:
        r: dict[str, Any] = {"voice": run("voice", c * args.per_run, c, args.turns, tmp, env, args.profile if first else 0)}
        if args.text:
            r["text"] = run("text", c * args.per_run, c, args.turns, tmp, env)
        r["held"] = held(r["voice"])
        results.append(r)
        v = r["voice"]
        print(f"voice {c}: {v['completed']}/{v['conversations']} completed, heard p50/p95/p99 "
              f"{v['from_recordings']['heard_latency_s']}, CPU {v['cpu_s_per_conversation_minute']} s per "
              f"conversation-minute, RSS {v['rss_per_session_mb']} MB/session, load {v['load_average_after']}"
              + (f" | text: CPU {r['text']['cpu_s_per_conversation']} s/conversation" if args.text else ""),
              flush=True)
        save(out_path, results, args)
        return r

    for i, c in enumerate(int(x) for x in args.runs.split(",")):
        one(c, i == 0)
    good = [r["voice"]["concurrency"] for r in results if r["held"]]
    if args.search and good and max(good) == max(r["voice"]["concurrency"] for r in results):
        # every run up to the largest held: go on up until one does not
        c = max(good) + args.step
        while c <= args.search_max and one(c, False)["held"]:
            c += args.step
    elif args.search and not good:
        # none held: halve down from the smallest run until one holds
        c = min(r["voice"]["concurrency"] for r in results) // 2
        while c >= 1 and not one(c, False)["held"]:
            c //= 2
    save(out_path, results, args)
    print(f"wrote {out_path}")


def save(path: Path, results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    good = [r for r in results if r["held"]]
    bad = [r for r in results if not r["held"]]
    largest = max((r["voice"]["concurrency"] for r in good), default=None)
    nxt = min(bad, key=lambda r: r["voice"]["concurrency"]) if bad else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": "PYTHONPATH=.:tests .venv/bin/python benchmarks/bench_voice.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "criterion": f"every conversation completed and heard-latency p95 < {P95_LIMIT_S} s (from the recordings)",
        "largest_concurrency_held": largest,
        "limited_by": limit_of(nxt["voice"]) if nxt else None,
        "runs": results,
    }, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
