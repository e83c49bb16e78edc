"""Voice mode: a conversation's stereo recording and its voice metrics, from the two listeners' channels.

Each agent records the peer's track as its subscription received it and puts that channel in
the JetStream object store (worker/voice/recorder.py), then publishes a ``RecordingChannel`` event.
On each such event the sink looks for both channels of that attempt; once both are there it
merges them (customer left, support right, from the conversation's first audio), writes
``recordings/<conversation_id>.wav`` atomically, measures the voice metrics on that file and the
conversation's turn lines (core/voice.py) and puts them in ``batch.json`` and on /metrics.
Redone on the second event, so whichever channel arrives last completes the file; a rewrite
gives the same bytes. The ids are typed (validated on decode) and the path is checked again
under the data directory (files.DataDir).

The file and the figures belong to the conversation's latest attempt: a channel of an attempt
older than one ``batch.json`` knows of (a newer attempt dispatched, settled or recorded) is acked
and dropped, never merged, so a failed attempt's late channel cannot overwrite the settled
attempt's WAV (``core.batch_doc.stale_recording``; the metrics carry their ``attempt``). Channel
events are handled one at a time (turns.py ``_record``), so that check and the write never
interleave with another attempt's; ``set_voice`` checks again against the document it changes, and
a file a newer attempt's dispatch made stale while it was merged is removed. An older attempt's file
already on disk goes when the newer attempt is dispatched (docs.py, ``core.batch_doc.superseded_recording``),
so a settled attempt whose recording never arrives (``recording_missing``) has none beside it.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ObjectNotFoundError

from shared import streams
from shared.contracts import ROLES, ContractError, RecordingChannel, Role, decode
from shared.log import kv
from shared.metrics import SinkMetrics

from . import files
from .core import voice
from .core.batch_doc import stale_recording
from .core.transcript import decode_voice_line
from .docs import Docs

log = logging.getLogger("sink")


class Recordings:
    def __init__(self, js: JetStreamContext, io: files.Io, docs: Docs, metrics: SinkMetrics) -> None:
        self.js = js
        self.io = io
        self.docs = docs
        self.metrics = metrics

    async def _channel(self, ev: RecordingChannel, role: Role) -> tuple[RecordingChannel, voice.Channel] | None:
        """``role``'s channel of ``ev``'s attempt, with the event stored as its description; None if absent."""
        store = await streams.recordings(self.js)
        try:
            obj = await store.get(streams.recording_object(ev.batch_id, ev.conversation_id, ev.attempt, role))
        except (ObjectNotFoundError, NotFoundError):
            return None
        about = decode((obj.info.description or "").encode(), RecordingChannel)
        if (about.batch_id, about.conversation_id, about.attempt, about.role) != (
                ev.batch_id, ev.conversation_id, ev.attempt, role):
            raise ContractError("description", "the object's event is for another channel")
        return about, voice.Channel(pcm=obj.data or b"", sample_rate=about.sample_rate, start_at=about.start_at)

    async def on_channel(self, ev: RecordingChannel, msg: Msg) -> list[Msg]:
        """Handle one channel event; returns the messages to ack now (the rest are acked with batch.json)."""
        try:
            if await self._stale(ev):
                return [msg]
            found = [await self._channel(ev, role) for role in ROLES]
            path = self.io.dirs.recording(ev.batch_id, ev.conversation_id)
            transcript = self.io.dirs.transcript(ev.batch_id, ev.conversation_id)
        except ContractError as exc:
            log.error("recording refused", extra=kv(field=exc.field, reason=exc.reason,
                                                    conversation_id=ev.conversation_id))
            return [msg]
        if any(f is None for f in found):
            return [msg]  # the other channel's event completes the file
        abouts = [f[0] for f in found if f is not None]
        customer, support = (f[1] for f in found if f is not None)
        origins = [a.origin_at for a in abouts if a.origin_at is not None]
        origin = min(origins) if origins else min(a.start_at for a in abouts)
        stereo, rate = voice.merge(customer, support, origin)
        await self.io.run(self._write, path, voice.wav_bytes(stereo, rate))
        turns = await self.io.run(_read_turns, transcript)
        m = voice.conversation_metrics(stereo, rate, turns, origin, f"recordings/{ev.conversation_id}.wav",
                                       attempt=ev.attempt)
        self._observe(m)
        log.info("recording written", extra=kv(batch_id=ev.batch_id, conversation_id=ev.conversation_id,
                                               attempt=ev.attempt, seconds=m.duration_s, turns=len(turns)))
        await self.docs.set_voice(ev.batch_id, ev.conversation_id, m, [msg])
        if await self._stale(ev):  # a newer attempt was dispatched while this one was merged: not its file
            await self.io.run(path.unlink, True)
        return []

    async def _stale(self, ev: RecordingChannel) -> bool:
        """True (logged) if ``batch.json`` already knows a newer attempt of the conversation."""
        entry = (await self.docs.get(ev.batch_id)).conversations.get(ev.conversation_id)
        if entry is None or not stale_recording(entry, ev.attempt):
            return False
        log.info("recording of a superseded attempt dropped", extra=kv(
            batch_id=ev.batch_id, conversation_id=ev.conversation_id, attempt=ev.attempt, role=ev.role,
            latest=max(entry.attempts, entry.voice.attempt if entry.voice is not None else 0)))
        return True

    def _write(self, path: files.Path, data: bytes) -> None:
        self.io.dirs.ensure_dir(path.parent)
        files.write_atomic(path, data)

    def _observe(self, m: voice.VoiceMetrics) -> None:
        v = self.metrics
        v.voice_recordings.inc()
        for x in m.heard_latency_s:
            v.voice_heard_latency.observe(x)
        v.voice_overlap_ratio.observe(m.overlap_ratio)
        v.voice_awkward_silences.inc(m.awkward_silences)
        v.voice_unanswered_turns.inc(m.unanswered_turns)
        v.voice_false_interruptions.inc(m.false_interruptions)
        if m.time_to_first_audio_s is not None:
            v.voice_time_to_first_audio.observe(m.time_to_first_audio_s)
        if m.stt_wer is not None:
            v.voice_stt_wer.observe(m.stt_wer)
        for via, n in m.heard_via.items():
            v.voice_turns_heard.labels(via).inc(n)


def _read_turns(path: files.Path) -> list[voice.Turn]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.split(b"\n"):
        if line.strip():
            t = decode_voice_line(line)
            out.append(voice.Turn(turn=t.turn, role=t.role, text=t.text, started_at=t.started_at,
                                  audio_start_s=t.audio_start_s, audio_end_s=t.audio_end_s,
                                  heard_text=t.heard_text, heard_via=t.heard_via, language=t.language,
                                  unprompted=t.unprompted))
    return out
