"""The ``AgentSession`` of one job, text or voice: its model client, its speech client, its options.

livekit-agents keeps ``AgentSession`` under ``livekit.agents.voice`` for text sessions too; so does this.
Both crosstalk's pair (worker/pair/session.py starts it in the room, linked to the peer agent) and the
simulator's customer (worker/simulator/) build their session here.

Text mode: text in, text out: no VAD, no turn detector, no audio, no barge-in between the agents. The
session reads only the peer agent's ``lk.chat`` (AGENT participants accepted, that identity
only); what the agent says goes out as a coalesced transcription (worker/voice/transcription.py) and
to the peer through the bridge (worker/pair/conversation.py), not as the session's text output.

Voice mode (worker/voice/speech.py): STT and TTS on the speech API, Silero VAD, the peer's microphone
track in (16 kHz, 50 ms frames, through the recording tap of worker/voice/recorder.py) and this agent's
own microphone track out; the peer's ``lk.chat`` still carries each turn's words and index
(worker/pair/voice_conversation.py).
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol

import httpx2
import openai
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice import room_io
from livekit.plugins import openai as lk_openai

from shared.config import Settings
from shared.contracts import JobMetadata
from shared.voiceplan import VoicePlan
from worker.voice import speech as voice_mode


class Listener(Protocol):
    """What a session's events go to: a conversation (worker/pair/conversation.py and its kin)."""

    def on_item(self, ev: Any) -> None: ...

    def on_error(self, ev: Any) -> None: ...


# One TLS context per process: building one loads the CA store (0.1-0.2 s of CPU, measured in the
# worker's loop-blocked warnings), which livekit-plugins-openai would otherwise do for every job.
_TLS = ssl.create_default_context()


def model_client(settings: Settings, conversation: str | None = None) -> openai.AsyncClient:
    """The OpenAI-compatible client of one job (scripted model by default, a real one when configured).

    ``conversation`` (``<batch>/<conversation>/<attempt>``) goes along as a header, so the scripted
    model's served log can be compared with the transcripts (a real API ignores it).
    """
    return openai.AsyncClient(
        api_key=settings.model_api_key,
        base_url=settings.model_base_url,
        max_retries=0,
        default_headers={"X-Crosstalk-Conversation": conversation} if conversation else None,
        http_client=httpx2.AsyncClient(
            verify=_TLS,
            timeout=httpx2.Timeout(connect=15.0, read=30.0, write=5.0, pool=5.0),
            follow_redirects=True,
            limits=httpx2.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=120),
        ),
    )


def speech_client(settings: Settings) -> openai.AsyncClient:
    """The speech API's client (voice mode): the offline speech service, or the real provider's."""
    return openai.AsyncClient(
        api_key=settings.speech_api_key,
        base_url=settings.speech_base_url,
        max_retries=0,
        http_client=httpx2.AsyncClient(
            verify=_TLS,
            timeout=httpx2.Timeout(connect=15.0, read=60.0, write=10.0, pool=10.0),
            limits=httpx2.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=120),
        ),
    )


def new_session(settings: Settings, meta: JobMetadata, conv: Listener
                ) -> tuple[AgentSession, openai.AsyncClient, openai.AsyncClient | None]:
    """The job's ``AgentSession`` (text, or voice with STT/TTS on the speech service), its model
    client and its speech client (voice), the assistant messages fed to ``conv``."""
    client = model_client(settings, f"{meta.batch_id}/{meta.conversation_id}/{meta.attempt}")
    plan: VoicePlan | None = getattr(conv, "plan", None)  # voice mode's conversations carry their role's plan
    speech = speech_client(settings) if plan is not None else None
    if plan is not None:
        assert speech is not None
        stt, tts = voice_mode.speech_models(settings, plan, speech)
        session: AgentSession = AgentSession(
            llm=lk_openai.LLM(model=settings.model_name, client=client),
            stt=stt,
            tts=tts,
            vad=None,  # the VAD is inside the STT's stream adapter (worker/voice/speech.py), once per listener
            user_away_timeout=None,
            # the end of the peer's speech (Silero VAD, CROSSTALK_VAD_MIN_SILENCE_S) ends its turn; no
            # barge-in between the agents, no reply before the turn is over
            turn_handling={
                "turn_detection": "stt" if stt is not None else "manual",
                "endpointing": {"min_delay": 0.0},
                "interruption": {"enabled": False},
                "preemptive_generation": {"enabled": False},
            },
        )
    else:
        session = AgentSession(
            llm=lk_openai.LLM(model=settings.model_name, client=client),
            vad=None,
            user_away_timeout=None,
            # text in, text out: no VAD, no turn detector model, no barge-in between the agents
            turn_handling={
                "turn_detection": None,
                "interruption": {"enabled": False},
                "preemptive_generation": {"enabled": False},
            },
        )
    session.on("conversation_item_added", conv.on_item)
    session.on("error", conv.on_error)  # a broken completion ends the call before its partial text is recorded
    if plan is not None:
        session.on("user_state_changed", conv.on_user_state)  # type: ignore[attr-defined]
    return session, client, speech


def text_session(settings: Settings, meta: JobMetadata, conv: Listener) -> tuple[AgentSession, openai.AsyncClient]:
    """A text-only ``AgentSession`` on the job's model client, its assistant messages fed to ``conv``."""
    session, client, _ = new_session(settings, meta, conv)
    return session, client


def audio_input() -> room_io.AudioInputOptions:
    """Voice mode: the peer's track in at the listener's rate and frame size (worker/voice/speech.py).

    No auto gain control: RoomIO turns WebRTC's AGC on by default, one FFI round trip and a pass over
    every frame of every listener, to level a synthetic peer voice that needs none (and that the
    recording should carry as the room did).
    """
    return room_io.AudioInputOptions(sample_rate=voice_mode.INPUT_RATE, frame_size_ms=voice_mode.INPUT_FRAME_MS,
                                     pre_connect_audio=False, auto_gain_control=False)


def audio_output() -> room_io.AudioOutputOptions:
    """Voice mode: this agent's microphone track. No RED (each packet carrying the previous one again):
    loopback/LAN rooms lose no packets, and it doubles what livekit-server forwards and the listener unpacks."""
    return room_io.AudioOutputOptions(
        sample_rate=voice_mode.OUTPUT_RATE,
        track_publish_options=rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE, red=False))
