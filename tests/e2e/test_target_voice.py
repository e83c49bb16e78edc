"""Voice mode against a user's own agent: examples/target_agent, its own worker process, through audio tracks.

Everything real: nats-server, livekit-server, every crosstalk service under `just up` (the
offline speech service included), the example agent as a separate livekit-agents worker running
its own STT/LLM/TTS pipeline (livekit-plugins-openai pointed at crosstalk's speech service and
scripted model through its own environment, as any user could: no paid API is reachable here).
What livekit-server carried is read from its own RoomService API while the batch runs; what the
target said from its own log (ACME_JOB_LOG); the rest from the files on disk.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import api
from stack import running_stack
from support.target import Target, scenario_dir
from test_batch import read_audit
from test_target import SCENARIO, USERDATA, run_batch
from test_voice import AudioTracks, read_final, read_lines, read_recording

from shared import wer
from shared.rooms import room_name

pytestmark = pytest.mark.e2e

# the text-mode scenario, its lines in English only (the offline English voice speaks no Devanagari)
VOICE_SCENARIO = {**SCENARIO, "id": "acme-voice", "script": [
    {"role": "customer", "text": "Hello, I am locked out of my account since this morning."},
    {"role": "support", "text": "I can help with that. Could you confirm your registered mobile number?"},
    {"role": "customer", "text": "It ends in four four one seven."},
    {"role": "support", "text": "Thank you, you are verified. I have unlocked the account."},
    {"role": "customer", "text": "Great, I can log in again. Thanks!"},
    {"role": "support", "text": "Glad to help. Have a good day!", "end": True},
]}



@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("target-voice")
    scenarios = scenario_dir(tmp, VOICE_SCENARIO)
    with running_stack(tmp, CROSSTALK_JOIN_DEADLINE_S="60", CROSSTALK_TARGET_JOIN_S="30",
                       CROSSTALK_TARGET_REPLY_S="45", CROSSTALK_SCENARIO_DIR=str(scenarios)) as s:
        yield s


def voice_target(stack: Any, tmp: Path, name: str, **knobs: str) -> Target:
    """The example agent with its speech pointed at crosstalk's offline speech service (its own settings)."""
    return Target(stack, tmp, name, max_jobs=4, ACME_SPEECH_BASE_URL=stack.speech_url,
                  ACME_STT_MODEL="whisper-tiny.en", ACME_TTS_VOICE="en-joe", **knobs)


@pytest.fixture
def target(stack: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Target]:
    name, knobs = getattr(request, "param", ("acme-voice", {}))
    t = voice_target(stack, tmp_path, name, **knobs)
    yield t
    t.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"----- {name} (last lines)", t.out.read_text(errors="replace")[-4000:], sep="\n")


def check_speech_spans(stereo: np.ndarray, rate: int, turns: list[dict[str, Any]]) -> None:
    """Each turn's span holds at least 0.5 s of speech on its speaker's channel (customer left, support
    right) and begins and ends with it. No share of the span is asked for: the target's own TTS may
    pause between two sentences as long as its machine makes it, and the room carries that pause."""
    win = rate // 50  # 20-ms windows
    for t in turns:
        start, end = t["audio_start_s"], t["audio_end_s"]
        assert start is not None and end is not None and 0 <= start < end, t
        seg = stereo[int(start * rate): int(end * rate), 0 if t["role"] == "customer" else 1].astype(np.float64)
        loud = np.sqrt((seg[: len(seg) // win * win].reshape(-1, win) ** 2).mean(axis=1)) > 300
        assert loud.sum() >= 25 and loud[:5].any() and loud[-5:].any(), f"turn {t['turn']}: no speech on its channel"


@pytest.fixture
async def lkapi(stack: Any) -> AsyncIterator[api.LiveKitAPI]:
    client = api.LiveKitAPI(stack.livekit_url.replace("ws", "http", 1), "devkey", "secret")
    yield client
    await client.aclose()


async def test_a_voice_batch_of_3_against_the_example_agent(stack: Any, target: Target, lkapi: api.LiveKitAPI) -> None:
    bid = f"tgtv-{int(time.time())}"
    with AudioTracks(lkapi, bid) as pubs:
        batch = await run_batch(stack, {"batch_id": bid, "conversations": 3, "concurrency": 2, "mode": "voice",
                                        "scenario": "acme-voice", "max_turns": 4,
                                        "target_agent": target.name}, timeout=600)
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 3, 0), batch
    folder = stack.data_dir / "batches" / bid
    doc = read_final(folder, 3)
    jobs = {e["room"]: e for e in target.events("job")}
    replies: dict[str, list[str]] = {}
    for e in target.events("reply"):
        replies.setdefault(e["room"], []).append(e["text"])
    pairs: list[tuple[str, str]] = []
    heard_by_target: list[tuple[str, str]] = []
    for cid, conv in doc["conversations"].items():
        room = room_name(cid, conv["attempts"])
        # livekit-server's view: both sides published a microphone track, the target as an agent
        kinds = pubs.seen[room]
        assert kinds.get(conv["target_identity"]) == api.ParticipantInfo.Kind.AGENT, kinds
        assert any(i.startswith("sim-") and k == api.ParticipantInfo.Kind.STANDARD for i, k in kinds.items()), kinds
        turns = read_lines(folder / "conversations" / f"{cid}.jsonl")
        assert [t["role"] for t in turns] == ["customer", "support"] * 2, turns
        # the target's words exactly as the target says it published them; what the customer heard of them
        said = [t["text"] for t in turns if t["role"] == "support"]
        assert said == replies[room][: len(said)], (said, replies.get(room))
        support = [t for t in turns if t["role"] == "support"]
        assert all(t["heard_via"] == "stt" and t["heard_text"] for t in support), support
        pairs += [(t["text"], t["heard_text"]) for t in support]
        # the customer's words are its script's, as in text mode; what the target's STT heard of them,
        # as the target published it in the room
        assert turns[0]["text"] == VOICE_SCENARIO["script"][0]["text"]
        customer = [t for t in turns if t["role"] == "customer"]
        assert all(t["heard_via"] == "stt" and t["heard_text"] for t in customer), customer
        heard_by_target += [(t["text"], t["heard_text"]) for t in customer]
        # the recording: the room's two channels, speech inside each turn's span on its speaker's side
        stereo, rate = read_recording(folder / "recordings" / f"{cid}.wav")
        check_speech_spans(stereo, rate, turns)
        check_span_order(stereo, rate, turns)
        # the target ran under an audio simulation (SIMULATION_MODE_AUDIO = 2), scenario and all
        sim = jobs[room]["simulation"]
        assert sim["mode"] == 2 and sim["userdata"] == USERDATA and sim["run_id"] == bid
    measured = wer.corpus_wer(pairs, "en")
    theirs = wer.corpus_wer(heard_by_target, "en")
    print(f"target turns: customer's STT WER {measured:.3f} over {len(pairs)} turns; customer turns: target's "
          f"STT WER {theirs:.3f} over {len(heard_by_target)}; batch.json voice: {doc['voice']}")
    assert measured < 0.2
    assert doc["voice"]["stt_wer"] == pytest.approx(wer.corpus_wer(pairs + heard_by_target, "en"), abs=0.01)
    assert doc["voice"]["heard_latency_p95_s"] is not None
    audited = read_audit(stack, bid)
    for conv in audited["conversations"].values():
        assert conv["violations"] == [], conv["violations"]


FAILURES = [
    ("acme-voice-silent", {"ACME_NEVER_SPEAK": "1"}, "target_silent"),
    ("acme-voice-stops", {"ACME_STOP_AFTER": "1"}, "target_unresponsive"),
    ("acme-voice-leaves", {"ACME_LEAVE_AFTER": "1"}, "target_left"),
]


@pytest.mark.parametrize(("target", "reason"), [((n, k), r) for n, k, r in FAILURES], indirect=["target"],
                         ids=[r for _, _, r in FAILURES])
async def test_a_misbehaving_target_fails_with_its_named_reason_in_voice_mode(
        stack: Any, target: Target, reason: str) -> None:
    bid = f"tgtv-{reason.replace('_', '-')}-{int(time.time())}"
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 1, "concurrency": 1, "mode": "voice",
                                    "scenario": "acme-voice", "target_agent": target.name}, timeout=300)
    assert (batch["status"], batch["failed"]) == ("failed", 1), batch
    for conv in batch["conversations"].values():
        assert conv["reason"].startswith(reason), conv["reason"]


async def test_a_voice_target_without_a_worker_is_a_no_show(stack: Any) -> None:
    bid = f"tgtv-noshow-{int(time.time())}"
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 1, "concurrency": 1, "mode": "voice",
                                    "scenario": "acme-voice", "target_agent": "nobody-registered"}, timeout=180)
    assert (batch["status"], batch["failed"]) == ("failed", 1), batch
    assert next(iter(batch["conversations"].values()))["reason"].startswith("target_no_show"), batch


GREETING = "Welcome to Acme Bank, how can I help?"
SLACK_S = 0.05  # two spans of one channel's 10-ms blocks may touch within this


def check_span_order(stereo: np.ndarray, rate: int, turns: list[dict[str, Any]]) -> None:
    """The spans are positions in the recording: non-negative, inside it, in turn order; a support span
    starts after the customer's span before it ended, or the recording shows both speaking in the overlap."""
    duration = len(stereo) / rate
    spans = [t for t in turns if t.get("audio_start_s") is not None]  # a line without audio fields has none
    for t in spans:
        assert 0 <= t["audio_start_s"] < t["audio_end_s"] <= duration + SLACK_S, (t, duration)
    for prev, cur in zip(spans, spans[1:], strict=False):
        assert cur["audio_start_s"] >= prev["audio_start_s"], (prev, cur)
        if prev["role"] == "customer" and cur["role"] == "support" and cur["audio_start_s"] < prev["audio_end_s"] - SLACK_S:
            a, b = int(cur["audio_start_s"] * rate), int(prev["audio_end_s"] * rate)
            both = np.sqrt((stereo[a:b].astype(np.float64) ** 2).mean(axis=0))
            assert (both > 300).all(), f"turn {cur['turn']} starts inside turn {prev['turn']} with no overlap heard"


@pytest.mark.parametrize("target", [("acme-voice-greets", {"ACME_GREETING": GREETING})], indirect=True, ids=["greets"])
async def test_a_voice_target_that_greets_first_is_heard_out_and_never_misattributed(stack: Any, target: Target) -> None:
    """The greeting is turn 0 (support, unprompted) with its own span; the customer answers it; the
    first answer's span and heard text hold that answer only (a run before showed audio_start_s -4.28 s
    for it: the greeting's audio counted in)."""
    bid = f"tgtv-greet-{int(time.time())}"
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 1, "concurrency": 1, "mode": "voice",
                                    "scenario": "acme-voice", "max_turns": 4, "target_agent": target.name}, timeout=300)
    assert (batch["status"], batch["completed"]) == ("completed", 1), batch
    (cid, conv), = batch["conversations"].items()
    folder = stack.data_dir / "batches" / bid
    replies = [e["text"] for e in target.events("reply") if e["room"] == room_name(cid, conv["attempts"])]
    turns = read_lines(folder / "conversations" / f"{cid}.jsonl")
    assert [t["role"] for t in turns] == ["support", "customer", "support", "customer"], turns
    assert [t.get("unprompted", False) for t in turns] == [True, False, False, False], turns
    said = [t["text"] for t in turns if t["role"] == "support"]
    assert replies[0] == GREETING and said == replies[:2], (said, replies)  # the greeting, then one answer
    script = [line["text"] for line in VOICE_SCENARIO["script"] if line["role"] == "customer"]
    assert [t["text"] for t in turns if t["role"] == "customer"] == script[:2]
    answer = turns[2]  # what the customer heard of the first answer: that answer, not the greeting too
    assert answer["heard_via"] == "stt" and wer.wer(answer["text"], answer["heard_text"], "en") < 0.3, answer
    stereo, rate = read_recording(folder / "recordings" / f"{cid}.wav")
    check_span_order(stereo, rate, turns)
    check_speech_spans(stereo, rate, turns[1:])  # the greeting may have played out before the customer listened
    assert all(t["audio_start_s"] is not None for t in turns[1:]), turns
    doc = read_final(folder, 1)
    voice = doc["conversations"][cid]["voice"]
    print(f"greeting span: {turns[0].get('audio_start_s')}..{turns[0].get('audio_end_s')} s, heard "
          f"{turns[0].get('heard_text')!r}; spans {[(t.get('audio_start_s'), t.get('audio_end_s')) for t in turns]}; "
          f"voice {voice}")
    # the greeting answers nothing: no latency of its own, never an unheard STT turn
    assert voice["stt_unheard"] == 0 and len(voice["heard_latency_s"]) == 3 - (turns[0].get("audio_end_s") is None), voice
