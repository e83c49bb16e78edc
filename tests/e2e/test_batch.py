"""Whole stack, everything real but the scripted model: `just up`, a batch, transcripts on disk.

One stack (nats-server, livekit-server, model, allocator, dispatcher, sink, worker under
supervisord on free ports) serves every test of this module.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit import api, rtc
from stack import ROOT, free_ports, running_stack
from support.results import check_transcript, read_audit, read_batch, read_turns, wait_finished
from support.rooms import RoomPoller

from shared import bus, scenarios

pytestmark = pytest.mark.e2e

NATS_CLI = ROOT / ".tools" / "bin" / "nats"
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_stack(tmp_path_factory.mktemp("e2e"), CROSSTALK_MODEL_TTFT_MS="20",
                       CROSSTALK_MODEL_TOKENS_PER_S="2000", CROSSTALK_JOIN_DEADLINE_S="30") as s:
        yield s


@pytest.fixture
async def js(stack: Any) -> AsyncIterator[Any]:
    import nats

    nc = await nats.connect(stack.nats_url)
    yield nc.jetstream()
    await nc.drain()


class RoomWatch(RoomPoller):
    """Polls livekit-api while a batch runs: who is in each room of the batch, by role.

    A poller error is not swallowed: it fails the test on exit (support/rooms.py). ``rooms_seen``
    guards against a watch that never saw anything."""

    def __init__(self, lk: api.LiveKitAPI, prefix: str) -> None:
        super().__init__(lk, prefix)
        self.max_agents: dict[str, int] = defaultdict(int)
        self.two_agents_seen: set[str] = set()
        self.rooms_seen: set[str] = set()
        self.violations: list[str] = []

    def saw(self, room: Any, participants: list[Any]) -> None:
        self.rooms_seen.add(room.name)
        agents = [p for p in participants if p.kind == api.ParticipantInfo.Kind.AGENT]
        self.max_agents[room.name] = max(self.max_agents[room.name], len(agents))
        roles = [p.attributes.get("crosstalk.role") for p in agents if p.attributes.get("crosstalk.role")]
        if len(roles) != len(set(roles)):
            self.violations.append(f"{room.name}: two agents with one role {roles}")
        if len(agents) == 2 and sorted(roles) == ["customer", "support"]:
            self.two_agents_seen.add(room.name)


async def test_nats_pub_batch_runs_to_transcripts(stack: Any, lkapi: api.LiveKitAPI, js: Any) -> None:
    batch_id = "e2e-pub"
    with RoomWatch(lkapi, batch_id) as watch:
        # the documented way: a plain core publish with the NATS CLI
        subprocess.run([str(NATS_CLI), "--server", stack.nats_url, "pub", "batch.start",
                        json.dumps({"batch_id": batch_id, "conversations": 10, "concurrency": 5})],
                       check=True, capture_output=True, timeout=30)
        finished = await wait_finished(js, batch_id)
    assert finished.status == "completed", finished
    assert (finished.requested, finished.completed, finished.failed) == (10, 10, 0)
    batch = read_batch(stack, batch_id)
    assert batch["status"] == "completed" and batch["completed"] == 10
    assert len(batch["conversations"]) == 10
    for i in range(10):
        cid = f"{batch_id}-{i:05d}"
        conv = batch["conversations"][cid]
        assert conv["outcome"] == "completed" and conv["reason"], conv
        turns = read_turns(stack, batch_id, cid)
        check_transcript(turns, cid, max_turns=8)
        assert len(turns) == conv["turns"]
    # while it ran, each room held exactly two AGENT participants, one per role
    assert watch.rooms_seen, "the room watch never saw a room of the batch"
    assert not watch.violations
    assert len(watch.two_agents_seen) >= 1
    assert all(n <= 2 for n in watch.max_agents.values()), dict(watch.max_agents)
    # rooms are deleted when their conversation ends
    left = await lkapi.room.list_rooms(api.ListRoomsRequest())
    assert not [r.name for r in left.rooms if r.name.startswith(batch_id)]


async def test_hindi_batch_with_cli_is_byte_exact(stack: Any) -> None:
    batch_id = "e2e-hindi"
    env = dict(stack.env, NATS_URL=stack.nats_url)
    res = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "crosstalk"), "batch", "start", "-n", "3", "-c", "3",
         "--scenario", "hi-account-help", "--batch-id", batch_id, "--follow"],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert str(stack.data_dir / "batches" / batch_id) in res.stdout.replace("\n", "")
    read_batch(stack, batch_id)
    script = scenarios.get("hi-account-help").script
    for i in range(3):
        cid = f"{batch_id}-{i:05d}"
        path = stack.data_dir / "batches" / batch_id / "conversations" / f"{cid}.jsonl"
        raw = path.read_bytes()
        for line in script:
            assert line.text.encode("utf-8") in raw, "Devanagari stored as the same UTF-8 bytes"
        turns = read_turns(stack, batch_id, cid)
        assert [t["text"] for t in turns] == [line.text for line in script]


async def test_observer_sees_every_turn_as_transcription(stack: Any, lkapi: api.LiveKitAPI, js: Any) -> None:
    """A person joining the room sees each turn on lk.transcription from the agent that spoke it."""
    batch_id = "e2e-watch"
    import nats

    nc = await nats.connect(stack.nats_url)
    await nc.request("batch.start", json.dumps({"batch_id": batch_id, "conversations": 1,
                                                 "scenario": "hinglish-refund"}).encode(), timeout=15)
    await nc.drain()
    room_name = f"{batch_id}-00000-a1"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rooms = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
        if rooms.rooms:
            break
        await asyncio.sleep(0.05)
    token = (api.AccessToken("devkey", "secret").with_identity("observer")
             .with_grants(api.VideoGrants(room_join=True, room=room_name, hidden=True)).to_jwt())
    room = rtc.Room()
    seen: list[tuple[str, str, str]] = []

    def on_transcription(reader: rtc.TextStreamReader, sender: str) -> None:
        async def read() -> None:
            text = await reader.read_all()
            p = room.remote_participants.get(sender)
            role = p.attributes.get("crosstalk.role", "") if p else ""
            if text.strip():
                seen.append((sender, role, text.strip()))
        asyncio.ensure_future(read())

    room.register_text_stream_handler("lk.transcription", on_transcription)
    await room.connect(stack.livekit_url, token)
    try:
        finished = await wait_finished(js, batch_id, timeout=120)
        assert finished.status == "completed"
    finally:
        await room.disconnect()
    turns = read_turns(stack, batch_id, f"{batch_id}-00000")
    assert [(role, text) for _, role, text in seen] == [(t["role"], t["text"]) for t in turns]
    assert all(sender.startswith("agent-") for sender, _, _ in seen)


async def test_two_workers_one_killed_mid_batch(stack: Any, lkapi: api.LiveKitAPI, js: Any) -> None:
    """A second worker joins the pool; one is SIGKILLed mid-batch; every conversation is accounted for."""
    batch_id = "e2e-kill"
    env = dict(stack.env, NATS_URL=stack.nats_url, LIVEKIT_URL=stack.livekit_url, LIVEKIT_API_KEY="devkey",
               LIVEKIT_API_SECRET="secret", CROSSTALK_METRICS_PORT=str(free_ports(1)[0]),
               CROSSTALK_MODEL_URL=f"http://127.0.0.1:{stack.env['CROSSTALK_MODEL_PORT']}/v1",
               CROSSTALK_STACK=str(stack.run_dir))
    extra = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env,
                             stdout=open(stack.tmp / "worker2.log", "wb"), stderr=subprocess.STDOUT)
    try:
        await asyncio.sleep(8)  # registered with livekit-server
        import nats

        nc = await nats.connect(stack.nats_url)
        await nc.request("batch.start", json.dumps({"batch_id": batch_id, "conversations": 16,
                                                     "concurrency": 8}).encode(), timeout=15)
        with RoomWatch(lkapi, batch_id) as watch:
            # kill once some conversations are done and others are running
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = list((stack.data_dir / "batches" / batch_id / "conversations").glob("*.jsonl")) \
                    if (stack.data_dir / "batches" / batch_id / "conversations").exists() else []
                if len(done) >= 4:
                    break
                await asyncio.sleep(0.2)
            # the worker about to die really serves this batch
            assert b"ready announced" in (stack.tmp / "worker2.log").read_bytes()
            extra.send_signal(signal.SIGKILL)
            extra.wait(10)
            finished = await wait_finished(js, batch_id, timeout=400)
        await nc.drain()
    finally:
        if extra.poll() is None:
            extra.kill()
            extra.wait(10)
    assert finished.requested == 16 and finished.completed + finished.failed == 16
    batch = read_batch(stack, batch_id)
    assert len(batch["conversations"]) == 16
    for cid, conv in batch["conversations"].items():
        assert conv["outcome"] in ("completed", "failed") and conv["reason"], (cid, conv)
        if conv["outcome"] == "completed":
            check_transcript(read_turns(stack, batch_id, cid), cid, max_turns=8)
    assert watch.rooms_seen, "the room watch never saw a room of the batch"
    assert not watch.violations
    assert all(n <= 2 for n in watch.max_agents.values()), dict(watch.max_agents)
    # the worker killed mid-conversation left agents behind whose conversations were retried
    assert finished.completed >= 12, batch["conversations"]


def scrape(port: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def use_speech(stack: Any) -> None:
    """Real use of the stack's speech service, as an agent makes it: streamed pcm speech (time to
    first audio), and a transcription of that speech (Whisper)."""
    import io
    import wave

    import openai

    speech = openai.AsyncOpenAI(base_url=stack.speech_url, api_key="crosstalk-offline", max_retries=0)
    try:
        pcm = await speech.audio.speech.create(model="tts-1", voice="en-joe", input="Thanks for calling.",
                                               response_format="pcm")
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000)
            w.writeframes(pcm.content)
        heard = await speech.audio.transcriptions.create(model="whisper-1", file=("turn.wav", buf.getvalue()))
        assert "thank" in heard.text.lower(), heard.text
    finally:
        await speech.close()


async def test_metrics_and_dashboard_queries_after_a_real_batch(stack: Any, js: Any) -> None:
    """Every /metrics endpoint shows what the batch implies; every dashboard panel returns data."""
    from support.prometheus import Prometheus, dashboard_exprs, has_finite, wait_for

    ports = {name: stack.env[f"CROSSTALK_{name.upper()}_METRICS_PORT"]
             for name in ("dispatcher", "allocator", "sink", "model", "worker")}
    prom = Prometheus(proc=None, url=f"http://127.0.0.1:{stack.env['CROSSTALK_PROMETHEUS_PORT']}",  # type: ignore[arg-type]
                      workdir=stack.run_dir)
    prom.wait_targets_up(timeout=60)  # Prometheus has the series before the batch moves them
    await asyncio.sleep(6)
    before = {name: scrape(port) for name, port in ports.items()}
    await use_speech(stack)  # a text batch never calls the speech service: its panels need real use
    batch_id, n = "e2e-metrics", 5
    import nats

    nc = await nats.connect(stack.nats_url)
    await nc.request("batch.start", json.dumps({"batch_id": batch_id, "conversations": n,
                                                 "concurrency": n}).encode(), timeout=15)
    await nc.drain()
    finished = await wait_finished(js, batch_id)
    assert finished.completed == n, read_batch(stack, batch_id)["conversations"]
    batch = read_batch(stack, batch_id)
    turns = sum(c["turns"] for c in batch["conversations"].values())
    after = {name: scrape(port) for name, port in ports.items()}

    def delta(proc: str, name: str, **labels: str) -> float:
        return total(after[proc], name, **labels) - total(before[proc], name, **labels)

    assert delta("dispatcher", "crosstalk_conversations_total", outcome="completed") == n
    assert delta("dispatcher", "crosstalk_batches_total", outcome="completed") == 1
    assert delta("dispatcher", "crosstalk_dispatch_to_join_seconds_count") == n
    assert value(after["dispatcher"], "crosstalk_conversations_in_flight") == 0
    for role in ("customer", "support"):
        assert delta("allocator", "crosstalk_role_grants_total", role=role, outcome="granted") == n
    assert delta("allocator", "crosstalk_role_request_seconds_count") >= 2 * n
    assert delta("worker", "crosstalk_turns_total") == turns
    assert delta("worker", "crosstalk_turn_seconds_count") == turns
    # the peer job winds down just after the conversation's end event: give it a moment
    deadline = time.monotonic() + 30
    while delta("worker", "crosstalk_worker_jobs_total", outcome="completed") < 2 * n and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        after["worker"] = scrape(ports["worker"])
    assert delta("worker", "crosstalk_worker_jobs_total", outcome="completed") == 2 * n
    assert delta("sink", "crosstalk_transcript_turns_written_total") == turns
    assert delta("model", "crosstalk_model_requests_total") >= turns

    await use_speech(stack)  # and again, so every rate() over it has two scrapes that moved
    # the batch's effect has been scraped
    wait_for(lambda: has_finite(r := prom.query(
        f'sum(crosstalk_conversations_total{{outcome="completed"}}) >= {n}')) and r, 60,
        lambda: "conversations not scraped yet")
    def has_data(expr: str) -> bool:
        """As a Grafana time-series panel shows it: some finite point over the last minutes."""
        now = time.time()
        data = prom.api("query_range", {"query": expr, "start": str(now - 300), "end": str(now), "step": "2"})
        return any(math.isfinite(float(v)) for series in data["result"] for _, v in series["values"])

    # rates need two scrapes of a series born during the batch: poll until each panel has data
    pending = dashboard_exprs()
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if not has_data(p.expr)]
        await asyncio.sleep(1)
    empty = [f"{p.panel}: {p.expr}" for p in pending]
    assert not empty, "dashboard panels without data:\n" + "\n".join(empty)


async def test_regression_nothing_lost_20_at_10(stack: Any, js: Any) -> None:
    """CI's scale check: 20 conversations at concurrency 10; fails when a turn or a conversation is lost,
    never because the machine is slow (no timing assertions)."""
    batch_id, n = "e2e-regress", 20
    import nats

    from shared.contracts import ConversationEvent, TurnRecorded
    from shared.rooms import room_name

    nc = await nats.connect(stack.nats_url)
    await nc.request("batch.start", json.dumps({"batch_id": batch_id, "conversations": n, "concurrency": 10,
                                                 "max_turns": 6}).encode(), timeout=15)
    finished = await wait_finished(js, batch_id, timeout=600)
    batch = read_batch(stack, batch_id)
    assert (finished.completed, finished.failed) == (n, 0), batch["conversations"]
    # every turn event of the completed attempt is in its file exactly once, in order
    events: dict[str, dict[int, str]] = defaultdict(dict)
    for ev in await bus.replay(js, f"conv.{batch_id}.*.turn", ConversationEvent):
        assert isinstance(ev, TurnRecorded)
        if ev.attempt == batch["conversations"][ev.conversation_id]["attempts"]:
            events[ev.conversation_id][ev.turn] = ev.text
    await nc.drain()
    # every room as livekit-server saw it (webhooks), joined with the allocator's grants (the sink's
    # room audit): no two of one role, no agent without a grant, no third agent; and each completed
    # conversation's room held exactly one customer and one support agent participant
    batch = read_audit(stack, batch_id)
    violations = [v for c in batch["conversations"].values() for v in c["violations"]]
    assert {k: sum(v["kind"] == k for v in violations) for k in ("two_of_one_role", "no_grant", "third_agent")} \
        == {"two_of_one_role": 0, "no_grant": 0, "third_agent": 0}, violations
    for cid, conv in batch["conversations"].items():
        room = room_name(cid, conv["attempts"])
        agents = [p for p in conv["participants"] if p["room"] == room and p["kind"] == "agent"]
        assert sorted(p["role"] for p in agents) == ["customer", "support"], (room, conv["participants"])
        assert len({p["identity"] for p in agents}) == 2, (room, agents)
    assert len(batch["conversations"]) == n
    for cid in batch["conversations"]:
        turns = read_turns(stack, batch_id, cid)
        check_transcript(turns, cid, max_turns=6)
        assert {t["turn"]: t["text"] for t in turns} == events[cid]
