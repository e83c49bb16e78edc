"""Voice mode under a fault (issue 21): one of two worker processes SIGKILLed mid-call.

A voice batch of crosstalk's own pair on `just up` with CROSSTALK_WORKERS=2 (supervisord's `worker`
and `worker-2`); once calls are under way, the worker running the most jobs is SIGKILLed (as
benchmarks/chaos_faults.py does) and supervisord restarts it. The dispatcher retries what died in a
fresh room. What batch.json must show, measured on the files themselves:

- every conversation ends completed (after its retry) or failed with a named reason;
- each WAV is its settled attempt's: batch.json's voice figures carry that attempt, the turn lines
  say the same attempt, and the file is byte for byte the merge of that attempt's two channels as
  the object store holds them (a killed attempt's surviving channel never reaches it);
- the turn spans (``audio_start_s``/``audio_end_s``) sit where speech starts and stops on their
  speaker's channel of the WAV within 20 ms (10-ms frames, the tap's energy threshold), the worst
  deviation printed;
- a conversation whose settled attempt's channel never arrived says ``recording_missing``, and the
  batch's count agrees (when the kill causes none, none is claimed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from stack import Stack, running_stack
from support.harness import wait_finished
from test_voice import read_lines, read_recording

from services.sink.core import voice
from shared import streams
from shared.contracts import RecordingChannel, decode

pytestmark = pytest.mark.e2e

BATCH = "vfault"
CONVERSATIONS = 3
MAX_TURNS = 4
FRAME_S = 0.01  # speech located to the 10-ms frame, as the worker's tap locates it (worker/voice/recorder.py)
MAX_DEVIATION_S = 0.02
NAMED = re.compile(r"^[a-z_]+(: |$)")  # a reason starts with its name (shared/metrics.py REASONS)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("voice-faults"), CROSSTALK_WORKERS="2",
                       CROSSTALK_JOIN_DEADLINE_S="45") as s:
        time.sleep(3)  # both workers registered with livekit-server
        yield s


def active_jobs(stack: Stack) -> dict[str, float]:
    """Jobs running in each worker program, from its own /metrics (``worker``, ``worker-2``)."""
    out = {}
    for i, port in enumerate(stack.config().worker_metrics_ports()):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        found = re.search(r"^crosstalk_worker_active_jobs (\S+)$", text, re.M)
        out["worker" if i == 0 else f"worker-{i + 1}"] = float(found.group(1)) if found else 0.0
    return out


def stored_turns(folder: Path) -> dict[str, int]:
    convs = folder / "conversations"
    return {p.stem: len(p.read_bytes().splitlines()) for p in convs.glob("*.jsonl")} if convs.exists() else {}


def edges(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Speech onsets and offsets (seconds) on one channel: 10-ms frames louder than the tap's threshold."""
    win = int(rate * FRAME_S)
    n = len(x) // win
    loud = np.sqrt((x[: n * win].astype(np.float64).reshape(n, win) ** 2).mean(axis=1)) >= voice.SPEECH_RMS
    step = np.diff(np.concatenate([[0], loud.astype(np.int8), [0]]))
    return np.flatnonzero(step == 1) * FRAME_S, np.flatnonzero(step == -1) * FRAME_S


def span_deviations(stereo: np.ndarray, rate: int, turns: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """Per turn with a span: how far its start and its end are from the nearest speech onset and
    offset on its speaker's channel (customer left, support right)."""
    chans = {role: edges(stereo[:, i], rate) for i, role in enumerate(("customer", "support"))}
    out = []
    for t in turns:
        onsets, offsets = chans[t["role"]]
        assert len(onsets), f"turn {t['turn']}: no speech at all on the {t['role']}'s channel"
        out.append((t["turn"], float(np.abs(onsets - t["audio_start_s"]).min()),
                    float(np.abs(offsets - t["audio_end_s"]).min())))
    return out


async def settled_merge(js: Any, cid: str, attempt: int) -> tuple[bytes, float] | None:
    """The WAV the settled attempt's two channels make, as the object store holds them; None if one is absent."""
    store = await streams.recordings(js)
    found = {}
    for role in ("customer", "support"):
        try:
            obj = await store.get(streams.recording_object(BATCH, cid, attempt, role))
        except Exception:
            return None
        about = decode((obj.info.description or "").encode(), RecordingChannel)
        assert about.attempt == attempt, about
        found[role] = (about, voice.Channel(pcm=obj.data or b"", sample_rate=about.sample_rate, start_at=about.start_at))
    origins = [a.origin_at for a, _ in found.values() if a.origin_at is not None]
    origin = min(origins) if origins else min(a.start_at for a, _ in found.values())
    stereo, rate = voice.merge(found["customer"][1], found["support"][1], origin)
    return voice.wav_bytes(stereo, rate), origin


async def older_channels(js: Any, convs: dict[str, Any]) -> int:
    """Channels of attempts older than the settled one that reached the object store (kept out of every WAV)."""
    store = await streams.recordings(js)
    n = 0
    for cid, c in convs.items():
        for attempt in range(1, c["attempts"]):
            for role in ("customer", "support"):
                try:
                    await store.get(streams.recording_object(BATCH, cid, attempt, role))
                    n += 1
                except Exception:
                    pass
    return n


async def kill_mid_call(stack: Stack, folder: Path) -> dict[str, Any]:
    """SIGKILL the worker running the most jobs once every call is under way and none is over."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        turns = stored_turns(folder)
        if len(turns) >= 2 and max(turns.values()) >= 1:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"no call got under way: {stored_turns(folder)}")
    jobs = active_jobs(stack)
    name = max(jobs, key=lambda k: jobs[k])
    pid = stack.pids()[name]
    os.kill(pid, signal.SIGKILL)
    return {"program": name, "pid": pid, "active_jobs": jobs, "stored_turns": stored_turns(folder)}


async def test_a_worker_sigkilled_mid_call_leaves_every_recording_from_the_settled_attempt(stack: Stack) -> None:
    folder = stack.data_dir / "batches" / BATCH
    nc = await nats.connect(stack.nats_url)
    try:
        js = nc.jetstream()
        reply = await nc.request("batch.start", json.dumps({
            "batch_id": BATCH, "mode": "voice", "conversations": CONVERSATIONS, "concurrency": CONVERSATIONS,
            "max_turns": MAX_TURNS}).encode(), timeout=30)
        assert json.loads(reply.data)["accepted"], reply.data
        fault = await kill_mid_call(stack, folder)
        finished = await wait_finished(js, BATCH, timeout=240)
        doc = await final_doc(folder)
        convs = doc["conversations"]
        assert finished.requested == CONVERSATIONS and len(convs) == CONVERSATIONS, doc
        retried = {cid: c["attempts"] for cid, c in convs.items() if c["attempts"] > 1}
        print(f"fault: {fault}; finished {finished.status} completed {finished.completed} failed {finished.failed}; "
              f"retried {retried}")
        assert retried, f"the kill hit no call: {fault}, {convs}"  # it was mid-call: what died was retried
        worst: list[tuple[str, int, float, float]] = []
        missing = []
        for cid, c in sorted(convs.items()):
            assert c["outcome"] in ("completed", "failed") and c["reason"] and NAMED.match(c["reason"]), (cid, c)
            if c["reason"].startswith(voice.RECORDING_MISSING):
                missing.append(cid)
                assert c["outcome"] == "failed" and c.get("voice") is None, (cid, c)
                assert await settled_merge(js, cid, c["attempts"]) is None, f"{cid}: its recording is there"
                continue
            if c["outcome"] != "completed":
                continue
            # the settled attempt's: batch.json's figures, the turn lines and the file say the same attempt
            attempt, figures = c["attempts"], c["voice"]
            assert figures is not None and figures["attempt"] == attempt, (cid, c)
            turns = read_lines(folder / "conversations" / f"{cid}.jsonl")
            assert len(turns) == MAX_TURNS and {t["attempt"] for t in turns} == {attempt}, turns
            wav = folder / "recordings" / f"{cid}.wav"
            merged = await settled_merge(js, cid, attempt)
            assert merged is not None and wav.read_bytes() == merged[0], f"{cid}: the WAV is not attempt {attempt}'s"
            stereo, rate = read_recording(wav)
            assert figures["duration_s"] == pytest.approx(len(stereo) / rate, abs=0.002)
            for t in turns:
                assert 0 <= t["audio_start_s"] < t["audio_end_s"] <= len(stereo) / rate + FRAME_S, (cid, t)
            worst += [(cid, *d) for d in span_deviations(stereo, rate, turns)]
        assert missing == [cid for cid, c in convs.items() if c["reason"].startswith(voice.RECORDING_MISSING)]
        assert doc["voice"]["recording_missing"] == len(missing), doc["voice"]
        starts = max(worst, key=lambda w: w[2])
        ends = max(worst, key=lambda w: w[3])
        print(f"spans vs the WAV's speech over {len(worst)} turns: max start deviation {starts[2] * 1000:.0f} ms "
              f"({starts[0]} turn {starts[1]}), max end deviation {ends[3] * 1000:.0f} ms ({ends[0]} turn {ends[1]}); "
              f"recording_missing {len(missing)}; batch voice {doc['voice']}")
        print(f"older attempts' channels in the object store (none merged): {await older_channels(js, convs)}")
        assert worst and starts[2] <= MAX_DEVIATION_S and ends[3] <= MAX_DEVIATION_S, worst
    finally:
        await nc.drain()


async def final_doc(folder: Path, timeout: float = 90) -> dict[str, Any]:
    """batch.json once finished and every completed conversation has its figures or is marked missing."""
    deadline = time.monotonic() + timeout
    while True:
        path = folder / "batch.json"
        doc = json.loads(path.read_bytes()) if path.exists() else {}
        convs = doc.get("conversations", {})
        if doc.get("status") in ("completed", "failed") and all(
                c.get("voice") is not None for c in convs.values() if c.get("outcome") == "completed"):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never settled: {doc}")
        await asyncio.sleep(0.5)
