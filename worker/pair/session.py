"""The pair's ``AgentSession`` started in the room: linked to the peer agent only (its ``lk.chat``; in
voice mode its microphone track, through the recording tap), its words out as a coalesced transcription.

The session itself (models, options, text or voice) is built in worker/voice/session.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import openai
from livekit import rtc
from livekit.agents import AgentSession, JobContext
from livekit.agents.voice import room_io

from shared.config import Settings
from shared.contracts import JobMetadata, Role
from shared.scenarios import Scenario
from worker.pair.agents import agent_for
from worker.pair.conversation import Conversation
from worker.pair.voice_conversation import VoiceConversation
from worker.voice import speech as voice_mode
from worker.voice.recorder import Tap
from worker.voice.session import audio_input, audio_output, new_session
from worker.voice.transcription import CoalescedTranscription


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


async def start(ctx: JobContext, settings: Settings, meta: JobMetadata, role: Role, scenario: Scenario,
                conv: Conversation, peer: rtc.RemoteParticipant) -> Session:
    session, client, speech = new_session(settings, meta, conv)
    voice = isinstance(conv, VoiceConversation)
    # what the agent says, on lk.transcription for anyone watching the room, a few chunks per
    # second instead of one data packet per token (worker/voice/transcription.py)
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
