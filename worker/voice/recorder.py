"""What the room carried of the peer's voice: the listener's recording of the peer's track.

:class:`Tap` sits between RoomIO's audio input (the peer agent's subscribed microphone track,
16 kHz mono) and the ``AgentSession``: every frame the session hears is also written to a PCM
buffer on the audio's own timeline. livekit-rtc's frames carry no timestamp, so that timeline is
the sample clock (consecutive frames are consecutive audio) tied to the wall clock by the earliest
arrival it ever explains (sample 0 at ``start_at``). Three cases, each in tests/unit/test_voice_recorder.py:

- a frame later than ``GAP_S`` on that clock: the stretch before it is padded with silence, so the
  channel stays on the room's timeline (frames lost under load);
- frames that then arrive *ahead* of the wall clock (a late burst catching up: they were delayed,
  not lost): the padding was wrong and is taken back, latest first, so they sit where they belong
  instead of after the padding; without this the recording and the turn spans drifted by every
  stall of the loop, exactly when load is measured;
- a frame ahead with no padding to take back: sample 0 was earlier than the first frame's arrival
  said (it came late), so ``start_at`` moves earlier.

10-ms blocks louder than ``SPEECH_RMS`` are speech: the tap keeps the span of speech not yet
reported (a turn heard), the conversation's first speech (the recording's time zero) and when
speech was last heard.

At the end of the call the channel goes to the JetStream object store and a
:class:`~shared.contracts.RecordingChannel` event tells the sink, which merges the two channels
(services/sink/recordings.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from livekit import rtc
from livekit.agents.voice import io
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta

from shared import bus, streams, subjects
from shared.contracts import JobMetadata, RecordingChannel, Role, encode
from shared.log import kv

log = logging.getLogger("worker.recorder")

SPEECH_RMS = 300.0  # int16 RMS of a speech frame (about -40 dBFS); synthetic speech's pauses are near 0
BLOCKS_PER_S = 100  # speech is located to the 10-ms block within a frame
GAP_S = 0.5  # the sample clock this far behind the wall clock: frames were lost, pad with silence
SYNC_S = 0.001  # ahead of the wall clock by more than this: re-sync (less is float noise)


class Tap(io.AudioInput):
    def __init__(self, source: io.AudioInput | None, *, sample_rate: int) -> None:
        super().__init__(label="crosstalk-recorder", source=source)
        self.rate = sample_rate
        self.pcm = bytearray()
        self.start_at: float | None = None  # wall time of sample 0
        self.first_speech_at: float | None = None
        self.last_loud_wall = 0.0  # wall time a speech frame last arrived
        self.span: tuple[float, float] | None = None  # unreported speech: (start, end) on the sample clock
        self.padded_s = 0.0
        self._pads: list[list[int]] = []  # [position, samples] of each padding that may still be taken back

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await super().__anext__()
        self.add(frame, time.time())
        return frame

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    def add(self, frame: rtc.AudioFrame, now: float) -> None:
        x = np.frombuffer(frame.data, dtype=np.int16)
        if frame.num_channels > 1:
            x = x.reshape(-1, frame.num_channels)[:, 0]
        if frame.sample_rate != self.rate:  # RoomIO resamples to the rate asked; never expected
            idx = (np.arange(int(len(x) * self.rate / frame.sample_rate)) * frame.sample_rate / self.rate)
            x = x[idx.astype(np.int64)]
        if self.start_at is None:
            self.start_at = now - len(x) / self.rate
        behind = (now - self.start_at) - (self.samples + len(x)) / self.rate
        if behind > GAP_S:
            pad = int(behind * self.rate)
            self._pads.append([self.samples, pad])
            self.pcm.extend(bytes(2 * pad))
            self.padded_s += pad / self.rate
        t0 = self.start_at + self.samples / self.rate
        self.pcm.extend(x.astype("<i2").tobytes())
        loud = self._loud_blocks(x)
        if loud.size:
            # speech bounds to the 10-ms block, whatever the frame size
            block, first, last = self.rate // BLOCKS_PER_S, int(loud[0]), int(loud[-1])  # plain ints: times go to JSON
            t_first, t1 = t0 + first * block / self.rate, t0 + min(len(x), (last + 1) * block) / self.rate
            self.last_loud_wall = now - (len(x) / self.rate - (t1 - t0))
            if self.first_speech_at is None:
                self.first_speech_at = t_first
            self.span = (t_first, t1) if self.span is None else (self.span[0], t1)
        ahead = self.start_at + self.samples / self.rate - now
        if ahead > SYNC_S:
            self._resync(ahead)

    def _resync(self, ahead: float) -> None:
        """The audio runs ``ahead`` s past the wall clock, which live audio cannot: take back padding
        (latest first: those frames were late, not lost), then move sample 0 earlier by what is left."""
        left = int(round(ahead * self.rate))
        while left > 0 and self._pads:
            pos, n = self._pads[-1]
            k = min(n, left)
            del self.pcm[2 * (pos + n - k): 2 * (pos + n)]  # silence: the audio after it moves back k samples
            self._shift(-k / self.rate, after=self.start_at + (pos + n) / self.rate)  # type: ignore[operator]
            self.padded_s -= k / self.rate
            left -= k
            if k == n:
                self._pads.pop()
            else:
                self._pads[-1][1] = n - k
        if left > 0:
            self.start_at -= left / self.rate  # type: ignore[operator]
            self._shift(-left / self.rate, after=float("-inf"))

    def _shift(self, by: float, *, after: float) -> None:
        """Times on the sample clock at or past ``after`` move by ``by`` seconds."""
        if self.first_speech_at is not None and self.first_speech_at >= after - 1e-9:
            self.first_speech_at += by
        if self.span is not None:
            a, b = self.span
            self.span = (a + by if a >= after - 1e-9 else a, b + by if b >= after - 1e-9 else b)

    def _loud_blocks(self, x: np.ndarray) -> np.ndarray:
        """Indices of the frame's 10-ms blocks whose RMS is speech."""
        block = self.rate // BLOCKS_PER_S
        if not len(x) or block <= 0:
            return np.empty(0, dtype=np.int64)
        n = -(-len(x) // block)
        padded = np.zeros(n * block, dtype=np.float32)
        padded[: len(x)] = x
        rms = np.sqrt(np.mean(padded.reshape(n, block) ** 2, axis=1))
        return np.flatnonzero(rms >= SPEECH_RMS)

    def quiet_for(self, now: float) -> float:
        """Seconds since speech was last heard (infinite if never)."""
        return now - self.last_loud_wall if self.last_loud_wall else float("inf")

    def take_span(self) -> tuple[float, float] | None:
        """The speech heard since the last call (wall times on the sample clock), and forget it."""
        span, self.span = self.span, None
        return span


async def upload(js: JetStreamContext, tap: Tap, meta: JobMetadata, speaker: Role, origin_at: float | None) -> None:
    """The channel of ``speaker`` (the peer) to the object store, then its event to the sink."""
    if tap.start_at is None:
        log.warning("no audio heard: nothing to record", extra=kv(conversation=meta.conversation_id, role=speaker))
        return
    event = RecordingChannel(
        batch_id=meta.batch_id, conversation_id=meta.conversation_id, attempt=meta.attempt, role=speaker,
        sample_rate=tap.rate, start_at=tap.start_at, origin_at=origin_at, samples=tap.samples, at=time.time())
    store = await streams.recordings(js)
    name = streams.recording_object(meta.batch_id, meta.conversation_id, meta.attempt, speaker)
    # the event rides along as the object's description: the sink places a channel from the object alone
    await store.put(name, bytes(tap.pcm), meta=ObjectMeta(name=name, description=encode(event).decode()))
    await bus.publish(js, subjects.conv_event(meta.batch_id, meta.conversation_id, "recording"), event,
                      msg_id=f"{meta.conversation_id}:{meta.attempt}:recording:{speaker}")
    log.info("recording stored", extra=kv(conversation=meta.conversation_id, role=speaker,
                                          seconds=round(tap.samples / tap.rate, 2), padded_s=round(tap.padded_s, 2)))
