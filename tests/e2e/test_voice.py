"""Voice mode end to end, offline: `just up` (speech service included), voice batches, what the room carried.

Everything real: livekit-server carries both agents' microphone tracks (watched through its own
RoomService API while the batch runs), the speech service synthesises (Piper, espeak-ng) and
transcribes (faster-whisper), the sink writes the stereo recordings. The test reads the files
on disk: the recording's samples, the transcript lines, and computes the WER itself.
"""

from __future__ import annotations

import asyncio
import json
import time
import wave
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import api
from stack import running_stack
from support.harness import wait_finished

from shared import scenarios, wer

pytestmark = pytest.mark.e2e

AUDIO, MIC = api.TrackType.AUDIO, api.TrackSource.MICROPHONE


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_stack(tmp_path_factory.mktemp("voice"), CROSSTALK_JOIN_DEADLINE_S="60") as s:
        yield s


@pytest.fixture
async def nc(stack: Any) -> AsyncIterator[Any]:
    import nats

    conn = await nats.connect(stack.nats_url)
    yield conn
    await conn.drain()


class AudioTracks:
    """Polls livekit-server while a batch runs: which role published a microphone audio track in each room
    (and every participant that did, with its kind)."""

    def __init__(self, lk: api.LiveKitAPI, prefix: str) -> None:
        self.lk, self.prefix = lk, prefix
        self.publishers: dict[str, set[str]] = defaultdict(set)  # room -> roles with a published mic track
        self.seen: dict[str, dict[str, int]] = defaultdict(dict)  # room -> identity -> kind, any mic publisher
        self._task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            for room in (await self.lk.room.list_rooms(api.ListRoomsRequest())).rooms:
                if not room.name.startswith(self.prefix):
                    continue
                try:
                    res = await self.lk.room.list_participants(api.ListParticipantsRequest(room=room.name))
                except api.TwirpError as exc:
                    if exc.code == api.TwirpErrorCode.NOT_FOUND:
                        continue
                    raise
                for p in res.participants:
                    if any(t.type == AUDIO and t.source == MIC for t in p.tracks):
                        self.seen[room.name][p.identity] = p.kind
                    role = p.attributes.get("crosstalk.role")
                    if p.kind == api.ParticipantInfo.Kind.AGENT and role and any(
                            t.type == AUDIO and t.source == MIC for t in p.tracks):
                        self.publishers[room.name].add(role)
            await asyncio.sleep(0.5)

    def __enter__(self) -> AudioTracks:
        self._task = asyncio.ensure_future(self._poll())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
            raise AssertionError(f"track poller failed: {self._task.exception()!r}")
        self._task.cancel()


async def run_voice_batch(stack: Any, lkapi: api.LiveKitAPI, nc: Any, batch_id: str, **spec: Any) -> dict[str, Any]:
    with AudioTracks(lkapi, batch_id) as tracks:
        reply = await nc.request("batch.start", json.dumps({"batch_id": batch_id, "mode": "voice", **spec}).encode(),
                                 timeout=30)
        assert json.loads(reply.data)["accepted"], reply.data
        finished = await wait_finished(nc.jetstream(), batch_id, timeout=600)
    assert finished.status == "completed", finished
    # both agents of every conversation published a microphone track, as livekit-server saw it
    rooms = {room.rsplit("-a", 1)[0]: roles for room, roles in tracks.publishers.items()}
    assert len(rooms) == spec["conversations"], tracks.publishers
    assert all(roles == {"customer", "support"} for roles in rooms.values()), tracks.publishers
    return read_final(stack.data_dir / "batches" / batch_id, spec["conversations"])


def read_final(folder: Path, conversations: int, timeout: float = 120) -> dict[str, Any]:
    """batch.json once it is final and carries the voice metrics of every conversation."""
    deadline = time.monotonic() + timeout
    while True:
        path = folder / "batch.json"
        doc = json.loads(path.read_bytes()) if path.exists() else {}
        convs = doc.get("conversations", {})
        if doc.get("status") == "completed" and sum(1 for c in convs.values() if c.get("voice")) == conversations:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never got the voice metrics of {conversations} conversations: {doc}")
        time.sleep(0.5)


def read_recording(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (2, 2), "stereo 16-bit PCM"
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        return data, w.getframerate()


def check_turn_audio(stereo: np.ndarray, rate: int, turns: list[dict[str, Any]]) -> None:
    """Each turn's span holds speech on its speaker's channel (customer left, support right)."""
    for t in turns:
        start, end = t["audio_start_s"], t["audio_end_s"]
        assert start is not None and end is not None and 0 <= start < end, t
        ch = 0 if t["role"] == "customer" else 1
        seg = stereo[int(start * rate): int(end * rate), ch].astype(np.float64)
        win = rate // 50
        rms = np.sqrt((seg[: len(seg) // win * win].reshape(-1, win) ** 2).mean(axis=1))
        assert len(rms) > 10 and (rms > 300).mean() > 0.5, f"turn {t['turn']}: no speech on its channel"


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


async def test_english_voice_batch_through_audio_tracks(stack: Any, lkapi: api.LiveKitAPI, nc: Any) -> None:
    batch_id = "voice-en"
    doc = await run_voice_batch(stack, lkapi, nc, batch_id, conversations=5, concurrency=2, max_turns=4)
    folder = stack.data_dir / "batches" / batch_id
    assert doc["completed"] == 5 and doc["failed"] == 0
    pairs = []
    for cid, entry in doc["conversations"].items():
        assert entry["outcome"] == "completed", entry
        turns = read_lines(folder / "conversations" / f"{cid}.jsonl")
        assert [t["turn"] for t in turns] == list(range(4))
        stereo, rate = read_recording(folder / "recordings" / f"{cid}.wav")
        check_turn_audio(stereo, rate, turns)
        assert all(t["heard_via"] == "stt" and t["heard_text"] for t in turns)
        pairs += [(t["text"], t["heard_text"]) for t in turns]
    measured = wer.corpus_wer(pairs, "en")
    print(f"STT WER over {len(pairs)} turns: {measured:.3f}; batch.json says {doc['voice']['stt_wer']}")
    assert measured < 0.2
    assert doc["voice"]["stt_wer"] == pytest.approx(measured, abs=0.01)
    assert doc["voice"]["heard_latency_p95_s"] is not None and doc["voice"]["note"] is None


async def test_hindi_voice_batch_hears_the_speakers_text(stack: Any, lkapi: api.LiveKitAPI, nc: Any) -> None:
    batch_id = "voice-hi"
    doc = await run_voice_batch(stack, lkapi, nc, batch_id, conversations=2, concurrency=2, max_turns=4,
                                scenario="hi-account-help")
    folder = stack.data_dir / "batches" / batch_id
    script = [line.text for line in scenarios.get("hi-account-help").script]
    for cid in doc["conversations"]:
        raw = (folder / "conversations" / f"{cid}.jsonl").read_bytes()
        turns = read_lines(folder / "conversations" / f"{cid}.jsonl")
        for t in turns:
            # Devanagari byte-exact, as the script says it
            assert t["text"] == script[t["turn"]] and script[t["turn"]].encode() in raw
            assert t["heard_via"] == "speaker_text" and t["heard_text"] == t["text"]
        stereo, rate = read_recording(folder / "recordings" / f"{cid}.wav")
        check_turn_audio(stereo, rate, turns)  # espeak-ng speech on the speaker's channel
    assert doc["voice"]["heard_via"] == {"speaker_text": 8}
    assert "speaker_text" in doc["voice"]["note"] and doc["voice"]["stt_wer"] is None
    # the speech service synthesised it with espeak-ng (its own accounting)
    assert stack_metric(stack, "speech", "crosstalk_speech_audio_seconds_total", engine="espeak") > 5


def stack_metric(stack: Any, service: str, name: str, **labels: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = stack.config().metrics_ports[service]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
