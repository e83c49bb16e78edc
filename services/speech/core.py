"""The speech service's pure core: what a request asks for, and what the answer looks like.

``/v1/audio/speech`` takes OpenAI's JSON body (model, input, voice, response_format, speed,
instructions, stream_format); ``/v1/audio/transcriptions`` OpenAI's multipart form (file, model,
language, prompt, response_format, temperature). Everything is checked here against the voice
catalogue (shared/voices.py) and the limits, and every refusal names the field
(:class:`RequestError` -> HTTP 400 with OpenAI's error body). No I/O, no models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from shared import voices
from shared.openai_errors import RequestError, decode_json
from shared.voices import Voice

# response_format -> Content-Type. pcm: 16-bit signed little-endian mono at voices.OUTPUT_SAMPLE_RATE
# (OpenAI's raw format); the rest are encoded at that rate too.
CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",  # Opus in Ogg, as OpenAI sends it
    "aac": "audio/aac",
    "flac": "audio/flac",
}
SPEED_MIN, SPEED_MAX = 0.25, 4.0  # OpenAI's range
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


class SpeechBody(msgspec.Struct, frozen=True):
    model: str
    input: str
    voice: str | dict[str, Any]  # OpenAI also accepts {"id": "..."} for custom voices
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: str | None = None  # "sse" | "audio"; we always answer audio bytes (the plugin reads both)


_speech_decoder = msgspec.json.Decoder(SpeechBody)


@dataclass(frozen=True)
class SpeechJob:
    voice: Voice
    text: str
    response_format: str
    speed: float

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.response_format]


def _model(value: str, known: Sequence[str]) -> None:
    if value not in known:
        raise RequestError("model", f"unknown model {value!r} (known: {', '.join(known)})")


def decode_speech(body: bytes, max_chars: int) -> SpeechJob:
    req = decode_json(_speech_decoder, body)
    _model(req.model, voices.TTS_MODELS)
    name = req.voice if isinstance(req.voice, str) else req.voice.get("id")
    if not isinstance(name, str):
        raise RequestError("voice", "must be a voice name or {\"id\": name}")
    try:
        voice = voices.get(name)
    except voices.VoiceError as exc:
        raise RequestError(exc.param, exc.reason) from None
    if not req.input.strip():
        raise RequestError("input", "must not be empty")
    if not any(ch.isalnum() for ch in req.input):
        raise RequestError("input", "has nothing to say (no letters or digits)")
    if len(req.input) > max_chars:
        raise RequestError("input", f"is {len(req.input)} characters; at most {max_chars}")
    if req.response_format not in CONTENT_TYPES:
        raise RequestError("response_format", f"unsupported {req.response_format!r} (supported: "
                                              f"{', '.join(CONTENT_TYPES)})")
    if not SPEED_MIN <= req.speed <= SPEED_MAX:
        raise RequestError("speed", f"must be between {SPEED_MIN} and {SPEED_MAX}, got {req.speed}")
    if req.stream_format not in (None, "sse", "audio"):
        raise RequestError("stream_format", f"must be 'sse' or 'audio', got {req.stream_format!r}")
    return SpeechJob(voice, req.input, req.response_format, req.speed)


@dataclass(frozen=True)
class TranscribeJob:
    language: str
    prompt: str | None
    response_format: str
    temperature: float


def decode_transcription(fields: Mapping[str, Sequence[str]], has_file: bool) -> TranscribeJob:
    """The multipart form's text fields (each may repeat, e.g. ``languages[]``) and whether a file came."""

    def one(name: str) -> str | None:
        values = fields.get(name) or ()
        return values[-1] if values else None

    if not has_file:
        raise RequestError("file", "is required (multipart field 'file' with the audio)")
    model = one("model")
    if not model:
        raise RequestError("model", "is required")
    _model(model, voices.STT_MODELS)
    languages = [v for name in ("languages", "languages[]") for v in fields.get(name) or () if v]
    language = one("language") or (languages[0] if languages else "en")
    if voices.primary(language) not in voices.STT_LANGUAGES:
        raise RequestError("language", f"the offline recogniser ({voices.STT_MODEL}) transcribes "
                                       f"{', '.join(voices.STT_LANGUAGES)} only, not {language!r}")
    fmt = one("response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise RequestError("response_format", f"unsupported {fmt!r} (supported: {', '.join(TRANSCRIPTION_FORMATS)})")
    raw_t = one("temperature") or "0"
    try:
        temperature = float(raw_t)
    except ValueError:
        raise RequestError("temperature", f"must be a number, got {raw_t!r}") from None
    if not 0.0 <= temperature <= 1.0:
        raise RequestError("temperature", f"must be between 0 and 1, got {raw_t}")
    return TranscribeJob(voices.primary(language), one("prompt") or None, fmt, temperature)


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


_LANGUAGE_NAMES = {"en": "english", "hi": "hindi"}


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def transcription_body(job: TranscribeJob, segments: Sequence[Segment], duration: float) -> tuple[str, bytes]:
    """(Content-Type, body) in the shape OpenAI answers for ``job.response_format``."""
    text = " ".join(s.text.strip() for s in segments if s.text.strip())
    if job.response_format == "text":
        return "text/plain; charset=utf-8", (text + "\n").encode()
    if job.response_format in ("srt", "vtt"):
        sep = "," if job.response_format == "srt" else "."
        cues = [f"{_stamp(s.start, sep)} --> {_stamp(s.end, sep)}\n{s.text.strip()}\n" for s in segments]
        if job.response_format == "srt":
            body = "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, 1))
        else:
            body = "WEBVTT\n\n" + "\n".join(cues)
        return "text/plain; charset=utf-8", body.encode()
    usage = {"type": "duration", "seconds": max(1, round(duration))}
    obj: dict[str, Any] = {"text": text, "usage": usage}
    if job.response_format == "verbose_json":
        obj = {
            "task": "transcribe", "language": _LANGUAGE_NAMES.get(job.language, job.language),
            "duration": round(duration, 3), "text": text,
            "segments": [{"id": i, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
                         for i, s in enumerate(segments)],
            "usage": usage,
        }
    return "application/json", msgspec.json.encode(obj)
