"""Voice metrics and the stereo merge, pure (services/sink/core/voice.py): known inputs, known answers."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest

from services.sink.core import voice
from services.sink.core.voice import Channel, Turn

RATE = 16000


def tone(seconds: float, amp: int = 4000) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 220 * t) * amp).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def turn(n: int, role: str, start: float | None, end: float | None, **kw: object) -> Turn:
    return Turn(turn=n, role=role, text=str(kw.pop("text", "hello there")), started_at=100.0 + n,
                audio_start_s=start, audio_end_s=end, **kw)  # type: ignore[arg-type]


def test_segments_find_speech_and_bridge_short_pauses() -> None:
    x = np.concatenate([silence(1.0), tone(1.0), silence(0.1), tone(0.5), silence(2.0), tone(0.4)])
    segs = voice.segments(x, RATE)
    assert len(segs) == 2
    assert segs[0] == pytest.approx((1.0, 2.6), abs=0.03)  # the 0.1 s pause is bridged
    assert segs[1] == pytest.approx((4.6, 5.0), abs=0.03)


def test_quiet_noise_is_not_speech() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(RATE) * 50).astype(np.int16)  # about -56 dBFS
    assert voice.segments(x, RATE) == []


def test_merge_places_each_channel_on_the_wall_clock_from_the_origin() -> None:
    cust = Channel(pcm=tone(1.0).tobytes(), sample_rate=RATE, start_at=10.0)  # speaks at 10.0
    supp = Channel(pcm=np.concatenate([silence(0.5), tone(1.0)]).tobytes(), sample_rate=RATE, start_at=11.0)
    stereo, rate = voice.merge(cust, supp, origin_at=10.0)
    assert rate == RATE and stereo.shape == (int(2.5 * RATE), 2)
    assert voice.segments(stereo[:, 0], RATE) == [pytest.approx((0.0, 1.0), abs=0.03)]
    assert voice.segments(stereo[:, 1], RATE) == [pytest.approx((1.5, 2.5), abs=0.03)]
    # a channel that started before the origin is cut to it
    early = Channel(pcm=np.concatenate([silence(2.0), tone(1.0)]).tobytes(), sample_rate=RATE, start_at=8.0)
    stereo, _ = voice.merge(early, None, origin_at=10.0)
    assert voice.segments(stereo[:, 0], RATE) == [pytest.approx((0.0, 1.0), abs=0.03)]


def test_wav_is_stereo_16_bit() -> None:
    data = voice.wav_bytes(np.zeros((RATE, 2), dtype=np.int16), RATE)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, RATE, RATE)


def test_heard_latency_is_next_start_minus_previous_end_negative_for_overlap() -> None:
    turns = [turn(0, "customer", 0.0, 2.0), turn(1, "support", 2.8, 5.0), turn(2, "customer", 4.5, 6.0)]
    assert voice.heard_latencies(turns) == [0.8, -0.5]
    assert voice.heard_latencies([turn(0, "customer", 0.0, 2.0), turn(1, "support", None, None)]) == []


def test_percentiles() -> None:
    assert voice.percentile([], 95) is None
    assert voice.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert voice.percentile([0.5] * 99 + [10.0], 99) == pytest.approx(0.595)


def test_awkward_silences_are_gaps_over_three_seconds() -> None:
    speech = [(0.0, 1.0), (1.5, 2.0), (5.5, 6.0), (9.1, 9.5)]
    assert voice.awkward_silences(speech) == 2  # 3.5 s and 3.1 s; 0.5 s is not


def test_unanswered_turns_skip_the_last_turn() -> None:
    chans = {"customer": [(0.0, 2.0), (30.0, 31.0)], "support": [(2.5, 4.0)]}
    turns = [turn(0, "customer", 0.0, 2.0), turn(1, "support", 2.5, 4.0), turn(2, "customer", 30.0, 31.0)]
    # turn 1 (support, ends at 4.0): the customer only speaks again at 30 s; turn 2 is the last
    assert voice.unanswered_turns(turns, chans) == 1
    assert voice.unanswered_turns([turn(0, "customer", None, None), turn(1, "support", 2.5, 4.0)], chans) == 1


def test_false_interruption_is_speech_over_the_other_that_starts_no_turn() -> None:
    chans = {"customer": [(0.0, 3.0), (5.0, 6.0)], "support": [(1.0, 1.4), (3.5, 5.5)]}
    turns = [turn(0, "customer", 0.0, 3.0), turn(1, "support", 3.5, 5.5), turn(2, "customer", 5.0, 6.0)]
    # support's blip at 1.0 over the customer is one; the customer's turn 2 at 5.0 overlaps but is a turn
    assert voice.false_interruptions(turns, chans) == 1


def test_stt_wer_counts_only_stt_turns_and_normalises() -> None:
    turns = [turn(0, "customer", 0, 1, text="My order 42 arrived late.", heard_text="my order forty-two arrived late",
                  heard_via="stt"),
             turn(1, "support", 1, 2, text="one two three four", heard_text="one two three for", heard_via="stt"),
             turn(2, "customer", 2, 3, text="नमस्ते", heard_text="नमस्ते", heard_via="speaker_text")]
    w, words = voice.stt_wer(turns)
    assert words == 10 and w == pytest.approx(1 / 10, abs=1e-4)  # "forty two" is two words
    assert voice.stt_wer(turns[2:]) == (None, 0)


def test_an_unreported_or_empty_stt_turn_is_fully_misheard() -> None:
    """A listener that heard nothing of a turn (empty STT text, or no report at all from a listener
    that hears that role through STT) scores WER 1.0 on it, never drops out of the WER."""
    heard = turn(0, "customer", 0, 1, text="one two three four", heard_text="one two three four", heard_via="stt")
    empty = turn(2, "customer", 2, 3, text="five six", heard_text="", heard_via="stt")
    unreported = turn(4, "customer", 4, 5, text="seven eight", heard_via=None)
    w, words = voice.stt_wer([heard, empty, unreported])
    assert (w, words) == (pytest.approx(4 / 8), 8)
    assert voice.stt_unheard([heard, empty, unreported]) == 2
    assert voice.stt_wer([empty]) == (1.0, 2)
    # a role none of whose turns was reported through STT shows no STT to measure: left out
    lone = turn(1, "support", 1, 2, text="nine ten", heard_via=None)
    assert voice.stt_wer([heard, lone]) == (0.0, 4) and voice.stt_unheard([heard, lone]) == 0
    # speaker_text turns are not STT turns, whatever their text
    assert voice.stt_wer([turn(0, "customer", 0, 1, heard_text="", heard_via="speaker_text")]) == (None, 0)


def test_an_unprompted_turn_answers_nothing_and_is_never_unheard() -> None:
    """A target's greeting (turn 0) and follow-up: no latency of their own, out of the WER pairing,
    never counted unheard (a greeting may play out before the caller listens); the turn after one is timed."""
    greeting = turn(0, "support", None, None, text="Welcome to Acme", heard_via=None, unprompted=True)
    asked = turn(1, "customer", 1.0, 2.0, text="one two", heard_text="one two", heard_via="stt")
    reply = turn(2, "support", 2.5, 4.0, text="three four", heard_text="three four", heard_via="stt")
    follow = turn(3, "support", 4.2, 5.0, text="anything else", heard_text="", heard_via="stt", unprompted=True)
    after = turn(4, "customer", 5.5, 6.0, text="no thanks", heard_text="no thanks", heard_via="stt")
    turns = [greeting, asked, reply, follow, after]
    assert voice.heard_latencies(turns) == [0.5, 0.5]  # 1 -> 2, 3 -> 4; never 2 -> 3
    assert voice.stt_wer(turns) == (0.0, 6) and voice.stt_unheard(turns) == 0
    chans = {"customer": [(1.0, 2.0), (5.5, 6.0)], "support": [(2.5, 4.0), (4.2, 5.0)]}
    assert voice.unanswered_turns(turns, chans) == 0  # the greeting with no span is owed nothing


def test_wer_counts_an_unheard_hypothesis_as_every_word_wrong() -> None:
    from shared import wer

    assert wer.wer("my order arrived", None) == 1.0 and wer.wer("my order arrived", "") == 1.0
    assert wer.wer("", None) == 0.0
    assert wer.corpus_wer([("one two", "one two"), ("three four five", None), ("six", "")]) == pytest.approx(4 / 6)


def test_the_summary_counts_unheard_turns_and_the_voice_faults() -> None:
    m = voice.conversation_metrics(np.zeros((RATE, 2), dtype=np.int16), RATE,
                                   [turn(0, "customer", 0, 1, heard_text="", heard_via="stt")], 100.0,
                                   "recordings/c.wav", attempt=2)
    assert m.attempt == 2 and m.stt_unheard == 1 and m.stt_wer == 1.0
    s = voice.summary([m], {voice.RECORDING_MISSING: 2, voice.NO_AUDIO: 1})
    assert (s.stt_unheard, s.recording_missing, s.no_audio) == (1, 2, 1)


def test_conversation_metrics_and_summary_from_a_recording() -> None:
    left = np.concatenate([tone(2.0), silence(5.0), tone(1.0), silence(1.0)])  # customer 0-2, 7-8
    right = np.concatenate([silence(2.5), tone(2.0), silence(4.5)])  # support 2.5-4.5
    stereo = np.stack([left, right], axis=1)
    turns = [turn(0, "customer", 0.0, 2.0, heard_via="stt", heard_text="hello there"),
             turn(1, "support", 2.5, 4.5, heard_via="stt", heard_text="hello there"),
             turn(2, "customer", 7.0, 8.0, heard_via="speaker_text")]
    m = voice.conversation_metrics(stereo, RATE, turns, origin_at=101.5, recording="recordings/c.wav")
    assert m.heard_latency_s == [0.5, 2.5]
    assert m.overlap_ratio == 0.0 and m.awkward_silences == 0 and m.false_interruptions == 0
    assert m.unanswered_turns == 0
    assert m.time_to_first_audio_s == 1.5  # origin 101.5, turn 0 asked at 100.0
    assert m.stt_wer == 0.0 and m.stt_words == 4
    assert m.heard_via == {"stt": 2, "speaker_text": 1}
    s = voice.summary([m, m])
    assert s.conversations == 2 and s.heard_latency_p50_s == 1.5
    assert s.heard_via == {"stt": 4, "speaker_text": 2} and s.note == voice.SPEAKER_TEXT_NOTE
    assert voice.summary([]).note is None


def test_recording_ids_are_validated_before_a_path(tmp_path: Path) -> None:
    """A channel event's ids are checked on decode, and the data directory checks the path again."""
    import msgspec

    from services.sink.files import DataDir
    from shared.contracts import ContractError, RecordingChannel, decode

    body = {"batch_id": "b1", "conversation_id": "../../etc", "attempt": 1, "role": "customer",
            "sample_rate": 16000, "start_at": 1.0, "at": 2.0}
    with pytest.raises(ContractError) as err:
        decode(msgspec.json.encode(body), RecordingChannel)
    assert err.value.field == "conversation_id"
    dirs = DataDir(tmp_path)
    assert dirs.recording("b1", "c-1") == (tmp_path / "batches" / "b1" / "recordings" / "c-1.wav").resolve()
    for bad in ("../x", "a/b", "a.b"):
        with pytest.raises(ContractError):
            dirs.recording("b1", bad)


async def test_a_channel_of_a_superseded_attempt_is_dropped_before_the_store_is_read() -> None:
    """services/sink/recordings.py: batch.json knows attempt 2, so attempt 1's late channel is acked
    and nothing is read, merged or written (the object store here would fail if touched)."""
    from types import SimpleNamespace

    import msgspec

    from services.sink.core import BatchDoc, ConversationEntry
    from services.sink.recordings import Recordings
    from shared.contracts import RecordingChannel

    doc = BatchDoc(batch_id="b1", mode="voice", conversations={"c1": ConversationEntry(attempts=2)})

    class Docs:
        async def get(self, batch_id: str) -> BatchDoc:
            return doc

        async def set_voice(self, *a: object) -> None:
            raise AssertionError("figures of a superseded attempt")

    class Store(Exception):
        pass

    class Js:
        async def object_store(self, bucket: str) -> None:
            raise Store(bucket)

    rec = Recordings(js=Js(), io=None, docs=Docs(), metrics=None)  # type: ignore[arg-type]
    msg = SimpleNamespace()
    late = RecordingChannel(batch_id="b1", conversation_id="c1", attempt=1, role="customer", sample_rate=16000,
                            start_at=1.0, at=2.0)
    assert await rec.on_channel(late, msg) == [msg]  # type: ignore[arg-type]
    with pytest.raises(Store):  # the current attempt does go on to the object store
        await rec.on_channel(msgspec.structs.replace(late, attempt=2), msg)  # type: ignore[arg-type]


async def test_an_older_attempts_wav_goes_when_a_newer_attempt_is_dispatched(tmp_path: Path) -> None:
    """services/sink/docs.py with core.batch_doc.superseded_recording: attempt 1's recordings/c1.wav is
    removed once attempt 2 is dispatched (its figures leave batch.json then), so a settled attempt whose
    own recording never arrives (recording_missing) leaves no older file for a report to link."""
    from types import SimpleNamespace

    import msgspec

    from services.sink import files
    from services.sink.core import BatchDoc, ConversationEntry
    from services.sink.docs import Docs
    from shared.contracts import ConversationDispatched

    io = files.Io(tmp_path, 1)
    try:
        docs = Docs(io)
        wav = io.dirs.recording("b1", "c1")
        io.dirs.ensure_dir(wav.parent)
        for mode in ("text", "voice"):
            wav.write_bytes(b"RIFF attempt 1")
            docs._docs["b1"] = BatchDoc(batch_id="b1", mode=mode, conversations={"c1": ConversationEntry(attempts=1)})
            again = ConversationDispatched(batch_id="b1", conversation_id="c1", attempt=1, room="b1--c1--1", at=1.0)
            await docs.apply(again, SimpleNamespace())  # type: ignore[arg-type]
            assert wav.exists()  # the same attempt: its own file
            await docs.apply(msgspec.structs.replace(again, attempt=2), SimpleNamespace())  # type: ignore[arg-type]
            assert wav.exists() == (mode == "text"), mode
        # the dispatch read late, after attempt 2's own recording was merged: that file stays
        wav.write_bytes(b"RIFF attempt 2")
        figures = voice.conversation_metrics(np.zeros((RATE, 2), dtype=np.int16), RATE, [], 1.0, "r", attempt=2)
        docs._docs["b1"] = BatchDoc(batch_id="b1", mode="voice", conversations={
            "c1": ConversationEntry(attempts=1, voice=figures)})
        await docs.apply(msgspec.structs.replace(again, attempt=2), SimpleNamespace())  # type: ignore[arg-type]
        assert wav.exists()
    finally:
        io.close()

