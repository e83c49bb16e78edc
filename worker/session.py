"""The ``AgentSession`` of one job: its model client, its options, its room link to the peer agent.

Text mode: text in, text out: no VAD, no turn detector, no audio, no barge-in between the agents. The
session reads only the peer agent's ``lk.chat`` (AGENT participants accepted, that identity
only); what the agent says goes out as a coalesced transcription (worker/transcription.py) and
to the peer through the bridge (worker/conversation.py), not as the session's text output.

Voice mode (worker/voice.py): STT and TTS on the speech API, Silero VAD, the peer's microphone
track in (16 kHz, 50 ms frames, through the recording tap of worker/recorder.py) and this agent's
own microphone track out; the peer's ``lk.chat`` still carries each turn's words and index
(worker/voice_conversation.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx2
import openai
from livekit import rtc
from livekit.agents import AgentSession, JobContext
from livekit.agents.voice import room_io
from livekit.plugins import openai as lk_openai

from shared.config import Settings
from shared.contracts import JobMetadata, Role
from shared.scenarios import Scenario
from shared.voiceplan import VoicePlan
from worker import voice as voice_mode
from worker.agents import agent_for
from worker.conversation import Conversation
from worker.recorder import Tap
from worker.transcription import CoalescedTranscription
from worker.voice_conversation import VoiceConversation

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


@dataclass
class Session:
    agent: AgentSession
    transcription: CoalescedTranscription
    client: openai.AsyncClient
    speech: openai.AsyncClient | None = None

    async def aclose(self) -> None:
        await self.agent.aclose()
        await self.transcription.aclose()
        await self.client.close()
        if self.speech is not None:
            await self.speech.close()


def new_session(settings: Settings, meta: JobMetadata, conv: Conversation
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
            vad=None,  # the VAD is inside the STT's stream adapter (worker/voice.py), once per listener
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


def text_session(settings: Settings, meta: JobMetadata, conv: Conversation) -> tuple[AgentSession, openai.AsyncClient]:
    """A text-only ``AgentSession`` on the job's model client, its assistant messages fed to ``conv``."""
    session, client, _ = new_session(settings, meta, conv)
    return session, client


def audio_input() -> room_io.AudioInputOptions:
    """Voice mode: the peer's track in at the listener's rate and frame size (worker/voice.py).

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


async def start(ctx: JobContext, settings: Settings, meta: JobMetadata, role: Role, scenario: Scenario,
                conv: Conversation, peer: rtc.RemoteParticipant) -> Session:
    session, client, speech = new_session(settings, meta, conv)
    voice = isinstance(conv, VoiceConversation)
    # what the agent says, on lk.transcription for anyone watching the room, a few chunks per
    # second instead of one data packet per token (worker/transcription.py)
    transcription = CoalescedTranscription(ctx.room)
    session.output.transcription = transcription
    await session.start(
        agent_for(role, scenario, meta.language, conv),
        room=ctx.room,
        record=False,
        # not a session host: nobody drives these sessions from a frontend, and hosting streams
        # every state change and chat item to the room (lk.agent.session), i.e. to the peer agent
        session_host=False,
        room_options=room_io.RoomOptions(
            text_input=room_io.TextInputOptions(text_input_cb=conv.on_peer_text),
            audio_input=audio_input() if voice else False,
            audio_output=audio_output() if voice else False,
            text_output=False,  # the transcription goes out through CoalescedTranscription (set above)
            participant_kinds=[rtc.ParticipantKind.PARTICIPANT_KIND_AGENT],
            participant_identity=peer.identity,
            close_on_disconnect=False,
        ),
    )
    if isinstance(conv, VoiceConversation):
        # the peer's track as the session hears it is also the recording of the peer's channel
        conv.tap = Tap(session.input.audio, sample_rate=voice_mode.INPUT_RATE)
        session.input.audio = conv.tap
        conv.session = session  # to say "sorry, I didn't catch that" when the STT heard nothing
    return Session(session, transcription, client, speech)
