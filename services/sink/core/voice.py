"""Voice mode, pure: the stereo recording from the two listeners' channels, and the voice metrics
of a conversation measured on that recording and its turn lines. No I/O, no clock.

Metric names follow LiveKit's where one exists (``e2e_latency`` of livekit-agents' turn metrics,
its simulation metrics' overlap, awkward silences, unanswered turns, false interruptions, STT
WER); the definitions are in README.md ("Voice metrics"). Everything here is measured on what
the room carried: the recording (each channel is what the listener's subscription received) and
the turn lines' ``audio_start_s``/``audio_end_s`` (positions in that recording).
"""

from __future__ import annotations

import io
import wave
from collections.abc import Sequence

import msgspec
import numpy as np

from shared import wer as wer_mod

SPEECH_RMS = 300.0  # int16 RMS of a speech window (about -40 dBFS); as the worker's tap (worker/voice/recorder.py)
WINDOW_S = 0.02
BRIDGE_S = 0.3  # pauses shorter than this inside speech do not split it
AWKWARD_S = 3.0  # a silence longer than this between speech is awkward
UNANSWERED_S = 10.0  # a turn whose listener has not started speaking this long after it ended is unanswered
TURN_START_SLACK_S = 0.5  # speech starting this close to a turn's audio_start_s is that turn, not an interruption

Segment = tuple[float, float]

# Named outcomes of a voice conversation that has no figures (docs/ARCHITECTURE.md "Voice outcomes"):
# crosstalk's own faults, never the agent's, so a failed conversation is counted apart as infra.
RECORDING_MISSING = "recording_missing"  # its settled attempt's recording never reached the sink
NO_AUDIO = "no_audio"  # a crosstalk listener heard no speech at all (worker/pair/voice_conversation.py)


class Channel(msgspec.Struct, frozen=True, kw_only=True):
    """One listener's recording of one role: 16-bit mono PCM, sample 0 at wall time ``start_at``."""

    pcm: bytes
    sample_rate: int
    start_at: float


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """What the metrics read of a turn line."""

    turn: int
    role: str
    text: str
    started_at: float
    audio_start_s: float | None = None
    audio_end_s: float | None = None
    heard_text: str | None = None
    heard_via: str | None = None
    language: str | None = None
    unprompted: bool = False  # said with no turn of the other role waiting (a target's greeting, follow-up)


class VoiceMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation's voice metrics (``batch.json`` ``conversations.<id>.voice``)."""

    recording: str  # recordings/<conversation_id>.wav, relative to the batch folder
    duration_s: float
    heard_latency_s: list[float]  # per answered turn: its speech start - the previous turn's speech end
    heard_latency_p50_s: float | None
    heard_latency_p95_s: float | None
    heard_latency_p99_s: float | None
    overlap_ratio: float
    awkward_silences: int
    unanswered_turns: int
    false_interruptions: int
    time_to_first_audio_s: float | None
    stt_wer: float | None  # over the turns heard through STT, unreported and empty ones as fully misheard
    stt_words: int  # reference words behind stt_wer
    heard_via: dict[str, int]  # turns per way of hearing ("stt", "speaker_text", "none")
    stt_unheard: int = 0  # STT turns its listener never reported or heard as nothing (each WER 1.0)
    attempt: int = 0  # the attempt whose channels these are (0: written before attempts were recorded)


def merge(customer: Channel | None, support: Channel | None, origin_at: float) -> tuple[np.ndarray, int]:
    """The stereo recording (customer left, support right) on one timeline from ``origin_at``.

    Each channel is placed at its own wall-clock start, cut or padded with silence to the origin.
    Returns an ``(n, 2)`` int16 array and the sample rate.
    """
    rate = (customer or support).sample_rate if (customer or support) else 16000  # type: ignore[union-attr]
    cols: list[np.ndarray] = []
    for ch in (customer, support):
        if ch is None:
            cols.append(np.zeros(0, dtype=np.int16))
            continue
        x = np.frombuffer(ch.pcm, dtype="<i2")
        shift = int(round((ch.start_at - origin_at) * rate))
        x = x[-shift:] if shift < 0 else np.concatenate([np.zeros(shift, dtype=np.int16), x])
        cols.append(x)
    n = max(len(c) for c in cols)
    out = np.zeros((n, 2), dtype=np.int16)
    for i, c in enumerate(cols):
        out[: len(c), i] = c
    return out, rate


def wav_bytes(stereo: np.ndarray, rate: int) -> bytes:
    """A 16-bit PCM WAV file of ``stereo`` (``(n, 2)`` int16)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(stereo.astype("<i2").tobytes())
    return buf.getvalue()


def segments(x: np.ndarray, rate: int) -> list[Segment]:
    """Speech on one channel: windows louder than SPEECH_RMS, pauses under BRIDGE_S bridged (seconds)."""
    win = max(1, int(rate * WINDOW_S))
    n = len(x) // win
    if n == 0:
        return []
    frames = x[: n * win].astype(np.float32).reshape(n, win)
    loud = np.sqrt(np.mean(frames**2, axis=1)) >= SPEECH_RMS
    out: list[Segment] = []
    start: int | None = None
    for i, v in enumerate(loud):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start * WINDOW_S, i * WINDOW_S))
            start = None
    if start is not None:
        out.append((start * WINDOW_S, n * WINDOW_S))
    bridged: list[Segment] = []
    for seg in out:
        if bridged and seg[0] - bridged[-1][1] < BRIDGE_S:
            bridged[-1] = (bridged[-1][0], seg[1])
        else:
            bridged.append(seg)
    return bridged


def _total(segs: Sequence[Segment]) -> float:
    return sum(b - a for a, b in segs)


def _intersect(a: Sequence[Segment], b: Sequence[Segment]) -> list[Segment]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _union(a: Sequence[Segment], b: Sequence[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in sorted([*a, *b]):
        if out and s[0] <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], s[1]))
        else:
            out.append(s)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation, numpy's default); None for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def heard_latencies(turns: Sequence[Turn]) -> list[float]:
    """Per turn after the first: where its speech starts minus where the previous turn's ends (negative:
    overlap). An unprompted turn (a greeting, a follow-up) answers nothing: it has none."""
    ordered = sorted(turns, key=lambda t: t.turn)
    out = []
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.unprompted:
            continue
        if cur.turn == prev.turn + 1 and cur.audio_start_s is not None and prev.audio_end_s is not None:
            out.append(round(cur.audio_start_s - prev.audio_end_s, 3))
    return out


def awkward_silences(speech: Sequence[Segment], longer_than: float = AWKWARD_S) -> int:
    """Silences longer than ``longer_than`` between the first and the last speech (both channels)."""
    return sum(1 for a, b in zip(speech, speech[1:], strict=False) if b[0] - a[1] > longer_than)


def unanswered_turns(turns: Sequence[Turn], chans: dict[str, list[Segment]], within: float = UNANSWERED_S) -> int:
    """Turns, but the conversation's last, after whose speech the other role did not start speaking within
    ``within``. An unprompted turn (a greeting, a follow-up) is owed no answer: never counted."""
    ordered = sorted(turns, key=lambda t: t.turn)
    n = 0
    for t in ordered[:-1]:
        if t.unprompted:
            continue
        other = chans.get("support" if t.role == "customer" else "customer", [])
        if t.audio_end_s is None:
            n += 1
            continue
        end = t.audio_end_s
        if not any(end - TURN_START_SLACK_S <= a <= end + within for a, _ in other):
            n += 1
    return n


def false_interruptions(turns: Sequence[Turn], chans: dict[str, list[Segment]]) -> int:
    """Speech that starts while the other role speaks and starts no turn of its own (noise, a cut-in)."""
    starts = {role: [t.audio_start_s for t in turns if t.role == role and t.audio_start_s is not None]
              for role in ("customer", "support")}
    n = 0
    for role, segs in chans.items():
        other = chans["support" if role == "customer" else "customer"]
        for a, _ in segs:
            talking = any(o0 < a < o1 for o0, o1 in other)
            if talking and not any(abs(a - s) <= TURN_START_SLACK_S for s in starts[role]):
                n += 1
    return n


def stt_turns(turns: Sequence[Turn]) -> list[Turn]:
    """The turns whose listener hears through STT: those it reported as heard via STT, and those it
    never reported (``heard_via`` None) of a speaker whose other turns it heard via STT. Whether a
    listener hears through STT is per role (shared/voiceplan.py), so one STT report of a role's turns
    says it for all of them; a role with no report at all is left out (no evidence of an STT).
    Unprompted turns are left out: the listener may not have been listening yet (a greeting said
    before the call's audio was up), and nothing is owed to them; they are never counted unheard."""
    asked = [t for t in turns if not t.unprompted]
    by_stt = {t.role for t in asked if t.heard_via == "stt"}
    return [t for t in asked if t.heard_via == "stt" or (t.heard_via is None and t.role in by_stt)]


def stt_wer(turns: Sequence[Turn]) -> tuple[float | None, int]:
    """Corpus WER of ``heard_text`` against ``text`` over the STT turns (:func:`stt_turns`), and its
    reference words. A turn never reported, or heard as empty text, is fully misheard (shared/wer.py)."""
    pairs = [(t.text, t.heard_text if t.heard_via == "stt" else None) for t in stt_turns(turns)]
    if not pairs:
        return None, 0
    lang = next((t.language for t in turns if t.language), None) or "en"
    words = sum(len(wer_mod.normalize(r, lang).split()) for r, _ in pairs)
    return round(wer_mod.corpus_wer(pairs, lang), 4), words


def stt_unheard(turns: Sequence[Turn]) -> int:
    """STT turns with nothing heard: never reported, or reported as empty text."""
    return sum(1 for t in stt_turns(turns) if t.heard_via is None or not (t.heard_text or "").strip())


def conversation_metrics(stereo: np.ndarray, rate: int, turns: Sequence[Turn], origin_at: float,
                         recording: str, attempt: int = 0) -> VoiceMetrics:
    chans = {"customer": segments(stereo[:, 0], rate), "support": segments(stereo[:, 1], rate)}
    speech = _union(chans["customer"], chans["support"])
    spoken = _total(speech)
    lat = heard_latencies(turns)
    first = min(turns, key=lambda t: t.turn) if turns else None
    via: dict[str, int] = {}
    for t in turns:
        via[t.heard_via or "none"] = via.get(t.heard_via or "none", 0) + 1
    w, words = stt_wer(turns)
    return VoiceMetrics(
        recording=recording,
        duration_s=round(len(stereo) / rate, 3),
        heard_latency_s=lat,
        heard_latency_p50_s=percentile(lat, 50),
        heard_latency_p95_s=percentile(lat, 95),
        heard_latency_p99_s=percentile(lat, 99),
        overlap_ratio=round(_total(_intersect(chans["customer"], chans["support"])) / spoken, 4) if spoken else 0.0,
        awkward_silences=awkward_silences(speech),
        unanswered_turns=unanswered_turns(turns, chans),
        false_interruptions=false_interruptions(turns, chans),
        time_to_first_audio_s=round(origin_at - first.started_at, 3) if first is not None else None,
        stt_wer=w,
        stt_words=words,
        heard_via=via,
        stt_unheard=stt_unheard(turns),
        attempt=attempt,
    )


class VoiceSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The batch's voice metrics over its recorded conversations (``batch.json`` ``voice``)."""

    conversations: int
    heard_latency_p50_s: float | None
    heard_latency_p95_s: float | None
    heard_latency_p99_s: float | None
    overlap_ratio: float | None
    awkward_silences: int
    unanswered_turns: int
    false_interruptions: int
    time_to_first_audio_p50_s: float | None
    stt_wer: float | None  # reference-word weighted over the conversations' STT turns
    heard_via: dict[str, int]
    note: str | None = None
    stt_unheard: int = 0  # STT turns nothing was heard of (counted in stt_wer as fully misheard)
    # voice conversations that completed without their figures, by name (crosstalk's own faults):
    # recording_missing (a channel never reached the sink), no_audio (a listener heard no speech at all)
    recording_missing: int = 0
    no_audio: int = 0


SPEAKER_TEXT_NOTE = ("some turns were heard as the speaker's own text (heard_via: speaker_text): no offline "
                     "speech recognition exists for their language; configure a real STT for recognition")


def summary(metrics: Sequence[VoiceMetrics], faults: dict[str, int] | None = None) -> VoiceSummary:
    """Over the recorded conversations; ``faults``: conversations per fault name (``recording_missing``, ``no_audio``)."""
    faults = faults or {}
    lat = [x for m in metrics for x in m.heard_latency_s]
    durations = sum(m.duration_s for m in metrics)
    via: dict[str, int] = {}
    for m in metrics:
        for k, v in m.heard_via.items():
            via[k] = via.get(k, 0) + v
    words = sum(m.stt_words for m in metrics)
    ttfa = [m.time_to_first_audio_s for m in metrics if m.time_to_first_audio_s is not None]
    return VoiceSummary(
        conversations=len(metrics),
        heard_latency_p50_s=percentile(lat, 50),
        heard_latency_p95_s=percentile(lat, 95),
        heard_latency_p99_s=percentile(lat, 99),
        overlap_ratio=round(sum(m.overlap_ratio * m.duration_s for m in metrics) / durations, 4) if durations else None,
        awkward_silences=sum(m.awkward_silences for m in metrics),
        unanswered_turns=sum(m.unanswered_turns for m in metrics),
        false_interruptions=sum(m.false_interruptions for m in metrics),
        time_to_first_audio_p50_s=percentile(ttfa, 50),
        stt_wer=round(sum((m.stt_wer or 0.0) * m.stt_words for m in metrics) / words, 4) if words else None,
        heard_via=via,
        note=SPEAKER_TEXT_NOTE if via.get("speaker_text") else None,
        stt_unheard=sum(m.stt_unheard for m in metrics),
        recording_missing=faults.get(RECORDING_MISSING, 0),
        no_audio=faults.get(NO_AUDIO, 0),
    )
