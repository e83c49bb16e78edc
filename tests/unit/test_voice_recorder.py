"""The listener's recording tap (worker/voice/recorder.py): samples on the audio's clock, lost stretches padded,
speech spans and the first speech found, on real livekit-rtc frames."""

from __future__ import annotations

import numpy as np
from livekit import rtc

from worker.voice.recorder import Tap

RATE = 16000
FRAME = RATE // 20  # 50 ms


def frame(loud: bool) -> rtc.AudioFrame:
    t = np.arange(FRAME) / RATE
    x = (np.sin(2 * np.pi * 300 * t) * 5000).astype(np.int16) if loud else np.zeros(FRAME, dtype=np.int16)
    return rtc.AudioFrame(x.tobytes(), RATE, 1, FRAME)


def test_samples_spans_and_first_speech_on_the_sample_clock() -> None:
    tap = Tap(None, sample_rate=RATE)
    now = 1000.0
    pattern = [False] * 4 + [True] * 10 + [False] * 6  # speech from 0.2 s to 0.7 s
    for loud in pattern:
        now += 0.05
        tap.add(frame(loud), now)
    assert tap.start_at == 1000.0 and tap.samples == 20 * FRAME
    assert tap.first_speech_at == 1000.2
    start, end = tap.take_span() or (0.0, 0.0)
    assert (round(start, 3), round(end, 3)) == (1000.2, 1000.7)
    assert tap.take_span() is None  # reported once
    assert round(tap.quiet_for(now), 2) == 0.3


def test_a_lost_stretch_is_padded_with_silence_and_a_late_frame_is_not() -> None:
    tap = Tap(None, sample_rate=RATE)
    tap.add(frame(True), 10.05)
    tap.add(frame(True), 10.30)  # 0.2 s late: jitter, not a loss
    assert tap.samples == 2 * FRAME and tap.padded_s == 0
    tap.add(frame(True), 11.50)  # ~1.35 s of frames never came
    assert round(tap.padded_s, 2) == 1.35
    assert tap.samples == 2 * FRAME + int(1.35 * RATE) + FRAME
    # the span runs on the sample clock: it ends where the last frame sits in the recording
    span = tap.take_span()
    assert span is not None and round(span[1] - span[0], 2) == 1.5


def test_speech_is_located_to_the_10_ms_block_inside_a_long_frame() -> None:
    """A 100-ms frame whose speech stops after 30 ms: the span ends at 30 ms, not at the frame's end,
    and the times are plain floats (they go into JSON control messages)."""
    n = RATE // 10
    x = np.zeros(n, dtype=np.int16)
    t = np.arange(n) / RATE
    x[: 3 * RATE // 100] = (np.sin(2 * np.pi * 300 * t[: 3 * RATE // 100]) * 5000).astype(np.int16)
    tap = Tap(None, sample_rate=RATE)
    tap.add(rtc.AudioFrame(x.tobytes(), RATE, 1, n), 50.1)
    span = tap.take_span()
    assert span is not None and type(span[0]) is float and type(span[1]) is float
    assert (round(span[0], 3), round(span[1], 3)) == (50.0, 50.03)
    assert type(tap.first_speech_at) is float and round(tap.quiet_for(50.1), 3) == 0.07


# ---- re-sync: audio placed by the frames' own timeline under synthetic arrival patterns -------------

STEP = 0.1  # the worker's frames: 100 ms (worker/voice/speech.py INPUT_FRAME_MS)
LATENCY = 0.05  # the room's steady delivery delay: frame k's audio ends at its arrival k * STEP + STEP + LATENCY
TOLERANCE_S = 0.02


def marked(k: int) -> rtc.AudioFrame:
    """Frame k of a 100-ms stream: loud if k is a marker (every 5th), else silent."""
    n = int(RATE * STEP)
    t = np.arange(n) / RATE
    x = (np.sin(2 * np.pi * 300 * t) * 5000).astype(np.int16) if k % 5 == 0 else np.zeros(n, dtype=np.int16)
    return rtc.AudioFrame(x.tobytes(), RATE, 1, n)


def on_time(k: int) -> float:
    return 100.0 + (k + 1) * STEP + LATENCY


def feed(arrivals: dict[int, float]) -> Tap:
    """Frames in order of arrival (frames missing from ``arrivals`` were lost)."""
    tap = Tap(None, sample_rate=RATE)
    for k, at in sorted(arrivals.items(), key=lambda kv: (kv[1], kv[0])):
        tap.add(marked(k), at)
    return tap


def onsets(tap: Tap) -> list[float]:
    """Wall times (on the tap's clock) where each loud stretch of the recording starts."""
    x = np.frombuffer(bytes(tap.pcm), dtype="<i2").astype(np.float32)
    block = RATE // 100
    n = len(x) // block
    loud = np.sqrt(np.mean(x[: n * block].reshape(n, block) ** 2, axis=1)) >= 300
    starts = [i for i in range(n) if loud[i] and (i == 0 or not loud[i - 1])]
    assert tap.start_at is not None
    return [tap.start_at + i * block / RATE for i in starts]


def truth(ks: list[int]) -> list[float]:
    """Where marker frame k's audio lies on the room's timeline (its on-time arrival, minus its length)."""
    return [on_time(k) - STEP for k in ks if k % 5 == 0]


def assert_placed(tap: Tap, ks: list[int]) -> None:
    got, want = onsets(tap), truth(ks)
    assert len(got) == len(want), (got, want)
    worst = max(abs(g - w) for g, w in zip(got, want, strict=True))
    assert worst <= TOLERANCE_S, f"a marker {worst * 1000:.0f} ms off: {got} vs {want}"


def test_a_late_burst_that_catches_up_goes_where_it_belongs() -> None:
    """Frames 10-19 held back 1 s (the loop stalled), then delivered at once: the padding put in when
    frame 10 came late is taken back as the rest arrive ahead of the clock, and every frame sits
    at its own time; after the burst the stream is on time again, nothing padded."""
    arrivals = {k: on_time(k) for k in range(40)}
    for k in range(10, 20):
        arrivals[k] = on_time(19) + 0.001 * (k - 10)  # all at once, once the stall ends
    tap = feed(arrivals)
    assert_placed(tap, list(range(40)))
    assert tap.samples == 40 * int(RATE * STEP) and round(tap.padded_s, 3) == 0


def test_a_slow_catch_up_is_taken_back_frame_by_frame() -> None:
    """Frames 10-29 late by 1.2 s, then delivered at twice real time until caught up."""
    arrivals = {k: on_time(k) for k in range(50)}
    t = on_time(10) + 1.2
    for k in range(10, 50):
        arrivals[k] = max(t, on_time(k))
        t += STEP / 2
    tap = feed(arrivals)
    assert_placed(tap, list(range(50)))
    assert round(tap.padded_s, 3) == 0


def test_a_real_gap_stays_padded() -> None:
    """Frames 10-19 never come: the stretch stays silence of its own length, the rest on time."""
    ks = [k for k in range(40) if not 10 <= k < 20]
    tap = feed({k: on_time(k) for k in ks})
    assert_placed(tap, ks)
    assert abs(tap.padded_s - 1.0) <= TOLERANCE_S
    assert abs(tap.samples / RATE - 4.0) <= TOLERANCE_S


def test_a_gap_then_a_late_burst_takes_back_only_the_late_part() -> None:
    """Frames 10-14 lost, 15-24 held back and then delivered at once: 0.5 s stays padded, not 1.5 s."""
    ks = [k for k in range(40) if not 10 <= k < 15]
    arrivals = {k: on_time(k) for k in ks}
    for k in range(15, 25):
        arrivals[k] = on_time(24) + 0.001 * (k - 15)
    tap = feed(arrivals)
    assert_placed(tap, ks)
    assert abs(tap.padded_s - 0.5) <= TOLERANCE_S


def test_repeated_stalls_under_load_do_not_drift() -> None:
    """A stall of 0.6-1.4 s every 3 s of a 60-s stream, each followed by its burst: no drift at the end."""
    arrivals = {k: on_time(k) for k in range(600)}
    for start in range(20, 590, 30):
        held = 6 + start % 9
        release = on_time(start + held - 1)  # the last held frame's own time: the stream stays in order
        for i, k in enumerate(range(start, min(start + held, 600))):
            arrivals[k] = release + 0.001 * i
    tap = feed(arrivals)
    assert_placed(tap, list(range(600)))
    assert abs(tap.samples / RATE - 60.0) <= TOLERANCE_S


def test_a_first_frame_that_came_late_moves_sample_0_earlier() -> None:
    """The first frame 80 ms late (a subscription's first packets): the next, on time, re-anchors."""
    arrivals = {k: on_time(k) for k in range(20)}
    arrivals[0] += 0.08
    arrivals[1] = max(arrivals[1], arrivals[0] + 0.001)
    tap = feed(arrivals)
    assert_placed(tap, list(range(20)))
    assert tap.start_at is not None and abs(tap.start_at - (on_time(0) - STEP)) <= TOLERANCE_S


def test_a_span_and_first_speech_follow_the_re_sync() -> None:
    """The span reported for a turn heard in a late burst lies where the audio does, not after the padding."""
    arrivals = {k: on_time(k) for k in range(30)}
    for k in range(10, 20):
        arrivals[k] = on_time(19) + 0.001 * (k - 10)
    tap = Tap(None, sample_rate=RATE)
    for k, at in sorted(arrivals.items(), key=lambda kv: kv[1]):
        tap.add(marked(k), at)
        if k == 9:
            tap.take_span()  # the turn before: reported
    span = tap.take_span()
    assert span is not None
    assert abs(span[0] - (on_time(10) - STEP)) <= TOLERANCE_S and abs(span[1] - (on_time(25) )) <= TOLERANCE_S
