"""Voice mode of one agent: what it says with (TTS voice, rate, language), what it hears with (STT
or, where no offline STT exists for the language, the speaker's own text), and the process's VAD.

Both roles run the same pipeline: ``AgentSession`` with ``livekit-plugins-openai`` STT and TTS
pointed at the speech API (crosstalk's offline speech service by default; OpenAI, or
``OPENAI_BASE_URL``, when configured) and Silero VAD, whose end of speech after
``CROSSTALK_VAD_MIN_SILENCE_S`` of silence ends the peer's turn. Each agent publishes a
microphone track and listens to the peer agent's track only (worker/session.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import openai
from livekit.agents import vad as lk_vad
from livekit.plugins import openai as lk_openai

from shared import voices
from shared.config import Settings
from shared.contracts import HeardVia, Role
from shared.scenarios import Scenario

# RoomIO's input at 16 kHz in 50 ms frames (Whisper and Silero work at 16 kHz; one frame per 50 ms
# halves the per-frame work of the 24 kHz / 20 ms a default would cost); output at the TTS's 24 kHz.
INPUT_RATE = 16000
INPUT_FRAME_MS = 50
OUTPUT_RATE = voices.OUTPUT_SAMPLE_RATE


@dataclass(frozen=True)
class VoicePlan:
    """How one role speaks and listens in one conversation."""

    voice: str
    speed: float
    language: str  # what this role speaks
    hears_via: HeardVia  # how it gets the peer's words: "stt", or "speaker_text" (no STT for them)
    peer_language: str


def plan(scenario: Scenario, role: Role, language: str, settings: Settings) -> VoicePlan:
    """The role's voice and hearing; raises :class:`shared.voices.VoiceError` naming the field."""
    me = scenario.roles[role]
    peer = scenario.roles["support" if role == "customer" else "customer"]
    mine = me.language or language
    theirs = peer.language or language
    if settings.real_speech:
        voice = me.voice or "alloy"  # a real provider has its own voices; ours are offline names
        hears: HeardVia = "stt"
    else:
        voice = voices.check_voice(me.voice, mine).name
        hears = "stt" if voices.stt_offline(theirs) else "speaker_text"
    return VoicePlan(voice=voice, speed=me.speed, language=mine, hears_via=hears, peer_language=theirs)


def check(scenario: Scenario, language: str, settings: Settings) -> tuple[str, str] | None:
    """``(field, reason)`` if ``scenario`` cannot run in voice mode in ``language``, else None."""
    if not scenario.voice_mode:
        return "mode", f"scenario {scenario.id!r} disables voice mode (voice_mode: false); use mode 'text'"
    for role in ("customer", "support"):
        try:
            plan(scenario, role, language, settings)  # type: ignore[arg-type]
        except voices.VoiceError as exc:
            where = "language" if exc.param == "language" else f"scenario {scenario.id!r} {role} voice"
            return ("language" if exc.param == "language" else "scenario"), f"{where}: {exc.reason}"
    return None


_vad_lock = threading.Lock()
_vad: lk_vad.VAD | None = None


def process_vad(settings: Settings) -> lk_vad.VAD:
    """Silero VAD, loaded once per worker process (its model ships in livekit-plugins-silero) and
    shared by every session of the process: each session's stream keeps its own state."""
    global _vad
    with _vad_lock:
        if _vad is None:
            from livekit.plugins import silero

            _vad = silero.VAD.load(min_silence_duration=settings.vad_min_silence_s, sample_rate=INPUT_RATE)
        return _vad


def speech_models(settings: Settings, p: VoicePlan, client: openai.AsyncClient) -> tuple[Any, Any]:
    """``(stt, tts)`` on the speech API; stt is None when this role hears the speaker's text."""
    stt = None
    if p.hears_via == "stt":
        stt = lk_openai.STT(model=settings.voice_stt_model, language=p.peer_language.split("-")[0],
                            client=client, use_realtime=False)
    tts = lk_openai.TTS(model=settings.voice_tts_model, voice=p.voice, speed=p.speed, client=client,
                        response_format="pcm")
    return stt, tts
