"""The listener's recording tap (worker/recorder.py): samples on the audio's clock, lost stretches padded,
speech spans and the first speech found, on real livekit-rtc frames."""

from __future__ import annotations

import numpy as np
from livekit import rtc

from worker.recorder import Tap

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
