"""Voice mode of one agent: what it says with (TTS voice, rate, language), what it hears with (STT
or, where no offline STT exists for the language, the speaker's own text), and the process's VAD.

Who speaks with which voice and hears how is decided in shared/voiceplan.py (the dispatcher
checks the same plan before a batch starts). Both roles run the same pipeline: ``AgentSession`` with ``livekit-plugins-openai`` STT and TTS
pointed at the speech API (crosstalk's offline speech service by default; OpenAI, or
``OPENAI_BASE_URL``, when configured) and Silero VAD, whose end of speech after
``CROSSTALK_VAD_MIN_SILENCE_S`` of silence ends the peer's turn. Each agent publishes a
microphone track and listens to the peer agent's track only (worker/pair/session.py).
"""

from __future__ import annotations

import threading
from typing import Any, Final

import openai
from livekit.agents import stt as lk_stt
from livekit.agents import vad as lk_vad

# silero registers itself as a plugin on import, which livekit-agents allows on the main thread only:
# this module is imported there (worker/lifecycle/server.py), never first in a job thread
from livekit.plugins import openai as lk_openai
from livekit.plugins import silero

from shared import voices
from shared.config import Settings
from shared.voiceplan import VoicePlan

# RoomIO's input at 16 kHz in 100 ms frames (Whisper and Silero work at 16 kHz; every frame costs
# an FFI event, a RoomIO/recorder/STT-adapter hop and a VAD wake-up in Python whatever its length:
# 100 ms frames do that 10 times a second per listener, not 20); output at the TTS's 24 kHz.
INPUT_RATE: Final = 16000
INPUT_FRAME_MS = 100
OUTPUT_RATE = voices.OUTPUT_SAMPLE_RATE


# What a listener says when its STT heard nothing of the peer's turn (empty text): a person asks
# again rather than answering nothing, or answering an empty message the model would guess at.
# By the primary language this role speaks (shared/voiceplan.py VoicePlan.language); English otherwise.
SAY_AGAIN: Final = {
    "en": "Sorry, I didn't catch that. Could you say it again?",
    "hi": "माफ़ कीजिए, मैं सुन नहीं पाया। क्या आप फिर से कह सकते हैं?",
}


def say_again(language: str) -> str:
    """The short "sorry, I didn't catch that" in ``language`` (its primary subtag)."""
    return SAY_AGAIN.get(voices.primary(language), SAY_AGAIN["en"])


_vad_lock = threading.Lock()
_vad: lk_vad.VAD | None = None


def process_vad(settings: Settings) -> lk_vad.VAD:
    """Silero VAD, loaded once per worker process (its model ships in livekit-plugins-silero) and
    shared by every session of the process: each session's stream keeps its own state."""
    global _vad
    with _vad_lock:
        if _vad is None:
            _vad = silero.VAD.load(min_silence_duration=settings.vad_min_silence_s, sample_rate=INPUT_RATE)
        return _vad


def speech_models(settings: Settings, p: VoicePlan, client: openai.AsyncClient) -> tuple[Any, Any]:
    """``(stt, tts)`` on the speech API; stt is None when this role hears the speaker's text.

    The STT is wrapped in livekit-agents' ``StreamAdapter`` with the process's VAD here, and the
    session gets no VAD of its own (turn detection ``stt``: the adapter's end of speech, then its
    transcript, ends the peer's turn). A session VAD beside a non-streaming STT runs two Silero
    streams on the same audio (the session's, and the adapter the agent's ``stt_node`` adds): one
    inference per 32 ms twice over, measured as the worker's largest cost (benchmarks/README.md).
    """
    stt = None
    if p.hears_via == "stt":
        stt = lk_stt.StreamAdapter(
            stt=lk_openai.STT(model=settings.speech_stt_model, language=p.peer_language.split("-")[0],
                              client=client, use_realtime=False),
            vad=process_vad(settings))
    tts = lk_openai.TTS(model=settings.speech_tts_model, voice=p.voice, speed=p.speed, client=client,
                        response_format="pcm")
    return stt, tts
