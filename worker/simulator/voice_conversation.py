"""Voice mode against the user's own agent (the target): crosstalk's customer talks through audio tracks.

The customer (worker/simulator/customer.py) runs a voice ``AgentSession`` on the speech API, in its own room
connection as the standard ``lk.simulator`` participant: it publishes a microphone track and
listens to the target's (an AGENT participant; Silero VAD's end of speech, then the STT). The
target's dispatch says ``SIMULATION_MODE_AUDIO``, under which livekit-agents (1.8.9) keeps the
target's STT/TTS/VAD (it drops them in text mode only), so the unmodified agent runs its own
voice pipeline.

A target turn is recorded once both sides of it are in: the target's own words (its
``lk.transcription`` segments, exactly as it published them, complete when it is back to
``listening``: worker/simulator/target_reply.py) as ``text``, and what the customer's STT heard of its audio
(``heard_text``, ``heard_via: "stt"``), taken once that audio has been quiet for the VAD's
silence. The customer then answers what it heard. Its own turns go out only as audio (no
``lk.chat``: the target would hear them twice); each is recorded with what the target's STT made of
it, as the target published it on ``lk.transcription`` (attribute ``lk.transcribed_track_id`` = the
customer's track, final segments), or no ``heard_text`` if the target publishes none.

The recording: the target's channel is the customer's subscription to it (the recording tap of
worker/voice/recorder.py); the customer's channel comes from a hidden recorder in the same job, a
second connection (hidden, subscribe-only standard participant, invisible to the target) that
subscribes to the customer's microphone track as livekit-server carries it. Both go to the sink
like a crosstalk pair's channels (services/sink/recordings.py); time zero is the conversation's
first speech (the customer's, or the target's greeting when it speaks first).

What the target says while no customer turn waits for it (a greeting, a follow-up: an unprompted
turn, worker/simulator/customer.py) is heard like an answer, in the order it was said: once its audio is
quiet and transcribed it takes its own transcripts and audio span (:meth:`SimVoiceConversation.unprompted_span`),
so the next answer's ``heard_text`` and span hold that answer only.

What a person on the line would notice counts as they would: a target turn the customer's STT heard
as nothing is answered "sorry, I didn't catch that" (worker/voice/speech.py ``say_again``), never with an
empty message; a call the target answered only in text, its audio never reaching the customer, is
the target's failure (``target_silent``, judged a failed test), and one where crosstalk's own
customer was never heard on its track is crosstalk's (``no_audio``, infra, retried).
"""

from __future__ import annotations

import asyncio
import logging
import time

from livekit import api, rtc
from livekit.agents import Agent
from livekit.agents.voice import room_io
from nats.js import JetStreamContext

from shared.config import Settings
from shared.contracts import JobMetadata
from shared.log import kv
from shared.voiceplan import VoicePlan
from worker.lifecycle.turns import End, Speak
from worker.simulator.conversation import SimConversation
from worker.simulator.target_link import ATTR_AGENT_STATE
from worker.simulator.target_reply import BUSY_STATES, Reply
from worker.voice import recorder
from worker.voice import session as sessions
from worker.voice import speech as voice_mode
from worker.voice.recorder import Tap

log = logging.getLogger("worker.simulator")

STT_GRACE_S = 10.0  # the target's turn is over and its audio quiet, but no transcript: go on without one
CONNECT_S = 20.0
SPAN_WAIT_S = 3.0  # after the customer's speech played out, how long its audio may take to reach the recorder
TARGET_HEARD_WAIT_S = 8.0  # how long the target's transcript of a customer turn may take
SETTLE_S = 1.5  # no further transcript this long after the last one (or the target's turn began): all in


class SimVoiceConversation(SimConversation):
    def __init__(self, *, plan: VoicePlan, min_silence_s: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.plan = plan
        self.min_silence_s = min_silence_s
        self.end_grace_s = 60.0  # a goodbye is spoken before its turn is recorded
        self.tap: Tap | None = None  # the target's channel: the customer's subscription to its track
        self.mine: Tap | None = None  # the customer's channel: the hidden recorder's subscription
        self._parts: list[str] = []  # what the STT made of the target's current turn so far
        # what the target said, its text complete, waiting to be heard, in order: (words, an answer?)
        self._said: list[tuple[Reply, bool]] = []
        self._span: tuple[float, float] | None = None  # where the unprompted turn being recorded lies
        self._starts = 0
        self._completed = 0
        self._waiter: asyncio.Task[None] | None = None
        self.hidden: HiddenRecorder | None = None
        self.room_io: room_io.RoomIO | None = None
        self._heard_parts: list[str] = []  # the target's final transcripts of the customer's current turn
        self._heard_at = 0.0
        self._spoken = 0  # the customer's turns played out
        self.link.on_heard = self.on_heard

    @property
    def origin(self) -> float | None:
        """The recording's time zero: the conversation's first speech, the customer's or a greeting's
        (the target's turn 0, said before the customer speaks), so that no turn lies before it."""
        firsts = [t.first_speech_at for t in (self.mine, self.tap) if t is not None and t.first_speech_at is not None]
        return min(firsts) if firsts else None

    def _offset(self, at: float | None) -> float | None:
        origin = self.origin
        return None if at is None or origin is None else at - origin

    # -- the session's room I/O, the recording ---------------------------------------------

    async def start_session(self, settings: Settings, agent: Agent, peer: rtc.RemoteParticipant) -> None:
        """The customer's voice session in its own room connection: the target's track in (through
        the recording tap), the customer's microphone out; then until the target subscribes to it."""
        assert self.session is not None
        room = self.link.room
        subscribed = asyncio.Event()
        room.on("local_track_subscribed", lambda track: subscribed.set())
        self.hidden = HiddenRecorder(room.local_participant.identity)
        await self.hidden.start(settings, self.room, CONNECT_S)
        self.mine = self.hidden.tap
        # RoomIO on the customer's own connection, made here: given a room, AgentSession.start would
        # also connect the job's own agent participant (a third agent in the room, and no grant)
        self.room_io = room_io.RoomIO(self.session, room, options=room_io.RoomOptions(
            text_input=False, text_output=False,
            audio_input=sessions.audio_input(), audio_output=sessions.audio_output(),
            participant_kinds=[rtc.ParticipantKind.PARTICIPANT_KIND_AGENT], participant_identity=peer.identity,
            close_on_disconnect=False))
        await self.room_io.start()
        await self.session.start(agent, record=False, session_host=False)
        self.tap = Tap(self.session.input.audio, sample_rate=voice_mode.INPUT_RATE)
        self.session.input.audio = self.tap
        try:  # the customer's first words only once the target hears its track
            await asyncio.wait_for(subscribed.wait(), settings.target_join_s)
        except TimeoutError:
            log.warning("the target never subscribed to the customer's track", extra=kv(room=self.room))

    async def store_recording(self, js: JetStreamContext, meta: JobMetadata) -> None:
        try:
            for tap, role in ((self.tap, "support"), (self.mine, "customer")):
                if tap is not None:
                    await recorder.upload(js, tap, meta, role, self.origin)  # type: ignore[arg-type]
        except Exception:
            log.exception("could not store the recording", extra=kv(room=self.room))

    async def aclose(self) -> None:
        if self.room_io is not None:
            await self.room_io.aclose()
        if self.hidden is not None:
            await self.hidden.aclose()

    # -- hearing the target ----------------------------------------------------------------

    def on_user_state(self, ev: object) -> None:
        if getattr(ev, "new_state", None) == "speaking":
            self._starts += 1

    async def on_user_turn(self, transcript: str) -> bool:
        """The VAD ended a stretch of the target's speech and the STT transcribed it: never a reply
        by itself (the customer answers once the target's turn is over: :meth:`_hear`)."""
        self._completed += 1
        if transcript.strip():
            self._parts.append(transcript.strip())
        return False

    def on_reply(self, reply: Reply) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._hear_next(reply, prompted=True)

    def on_unprompted(self, said: Reply) -> None:
        if self._early is not None:  # before the support lease is held: recorded by record_early
            self._early.append(said)
            return
        self._hear_next(said, prompted=False)

    async def record_early(self) -> str:
        """What the target said before the customer's first words (a greeting), each a turn once its
        audio is heard out; what the customer heard of it is what it answers first (nothing heard,
        say a greeting played out before the customer listened: it speaks first, as a late caller would)."""
        assert self._early is not None
        heard: list[str] = []
        while self._early:
            said = self._early.pop(0)
            heard.append(await self._hear_turn(said, prompted=False))
        self._early = None  # no await since the list was last seen empty: nothing is left behind
        return "\n".join(h for h in heard if h)

    def _hear_next(self, said: Reply, *, prompted: bool) -> None:
        """Hear the target's words after what it said before them: one turn at a time, in order."""
        self._said.append((said, prompted))
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.ensure_future(self._hear())
            self._track(self._waiter)

    async def _hear(self) -> None:
        while self._said and not self.done.done():
            said, prompted = self._said.pop(0)
            await self._hear_turn(said, prompted=prompted)

    async def _hear_turn(self, said: Reply, *, prompted: bool) -> str:
        """Once the target's audio is quiet and every stretch of it is transcribed, the turn is heard:
        recorded with what the customer's STT made of it and where it lies. An unprompted turn takes its
        own transcripts and audio span, so neither goes into the next answer's ``heard_text`` or span;
        its audio may have played out before the customer listened (a greeting): then it has none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STT_GRACE_S + self.min_silence_s
        by_text = self.plan.hears_via == "speaker_text"  # no offline STT for the target's language
        while not self.done.done():
            quiet = self.tap is None or self.tap.quiet_for(time.time()) >= self.min_silence_s
            transcribed = self._starts <= self._completed and (bool(self._parts) or not prompted)
            if quiet and (by_text or transcribed):
                break
            if loop.time() > deadline:
                log.warning("no transcript of the target's turn: going on with what was heard",
                            extra=kv(room=self.room, parts=len(self._parts), unprompted=not prompted))
                break
            await asyncio.sleep(0.05)
        if self.done.done():
            return ""
        heard, self._parts = (said.text if by_text else " ".join(self._parts)), []
        span = self.tap.take_span() if self.tap is not None else None
        if prompted:
            await self._heard(said, heard=heard, span=span, via=self.plan.hears_via)
            return heard
        if span is None:  # none of its audio reached the customer: nothing heard, nothing to answer
            await self._record(said, prompted=False)
            return ""
        self._span = span
        await self._record(said, prompted=False, heard=heard, via=self.plan.hears_via)
        return heard

    def unprompted_span(self) -> tuple[float, float] | None:
        """The span :meth:`_hear_turn` took for the unprompted turn it records (heard out: all of its audio)."""
        span, self._span = self._span, None
        return span

    def answer(self, reply: Reply, heard: str | None) -> None:
        assert self.session is not None
        if heard:
            self.session.generate_reply(user_input=heard)
        else:  # the STT heard nothing: ask again, as a caller would
            log.info("nothing heard of the target's turn: asking again", extra=kv(room=self.room))
            self.session.say(voice_mode.say_again(self.plan.language))

    def finish(self, end: End) -> None:
        super().finish(self.audio_check(end))

    def audio_check(self, end: End) -> End:
        """``end``, or why it is not ok: the target answered without audio, or the customer's was never heard."""
        if not end.ok:
            return end
        if self.target_turns and (self.tap is None or self.tap.first_speech_at is None):
            return End(f"target_silent: agent {self.link.agent_name!r} answered {self.target_turns} turn(s) in text, "
                       "but no speech of it reached the caller on its audio track", ok=False, mine=True)
        if self._spoken and (self.mine is None or self.mine.first_speech_at is None):
            return End("no_audio: the hidden recorder heard no speech on the customer's track", ok=False, mine=True)
        return end

    # -- speaking --------------------------------------------------------------------------

    async def _say(self, speak: Speak, text: str, now: float, first_token_s: float | None) -> None:
        # The speech has played out (the session adds the message then): the target heard it in the
        # room, so its reply is expected from now on; the turn is recorded with where the hidden
        # recorder heard it and what the target's STT made of it (its lk.transcription of our track).
        self._spoken += 1
        self.span = await self._own_span()
        if speak.turn == 0:  # added once played out: the first turn began when its reply was asked for
            speak = speak._replace(started_at=min(self.turns.heard_at, speak.started_at))
        end = self.turns.spoken(speak.turn)
        await self.link.send_turn(text, speak.turn)
        heard = await self._heard_by_target()
        await self.reports.turn(speak.turn, text, started_at=speak.started_at, ended_at=now,
                                first_token_s=first_token_s, **self.turn_audio(), heard_text=heard,
                                heard_via="stt" if heard is not None else None)
        if end is not None:
            self.finish(end)

    def on_heard(self, text: str) -> None:
        self._heard_parts.append(text)
        self._heard_at = time.monotonic()

    async def _heard_by_target(self) -> str | None:
        """What the target's STT published of the customer's turn: its final transcripts until the
        target moves on (thinking or speaking: its turn ended) or goes quiet; None if it published none."""
        deadline = time.monotonic() + TARGET_HEARD_WAIT_S
        busy_since: float | None = None
        while not self.done.done() and (now := time.monotonic()) < deadline:
            peer = self.link.peer
            if peer is not None and peer.attributes.get(ATTR_AGENT_STATE) in BUSY_STATES:
                busy_since = busy_since or now
            # a transcript published with the state change may still be in flight: a little longer for it
            if busy_since is not None and (self._heard_parts or now - busy_since >= SETTLE_S):
                break
            if self._heard_parts and now - self._heard_at >= SETTLE_S:
                break
            await asyncio.sleep(0.05)
        heard, self._heard_parts = self._heard_parts, []
        return " ".join(heard) if heard else None

    async def _own_span(self) -> tuple[float, float] | None:
        deadline = time.monotonic() + SPAN_WAIT_S
        while self.mine is not None and time.monotonic() < deadline:
            if self.mine.span is not None and self.mine.quiet_for(time.time()) >= 0.3:
                break
            await asyncio.sleep(0.05)
        return self.mine.take_span() if self.mine is not None else None


class HiddenRecorder:
    """A hidden, subscribe-only connection of the customer's job that records the customer's own
    microphone track as livekit-server forwards it (the target cannot see it; the room audit counts
    agents only)."""

    def __init__(self, customer_identity: str) -> None:
        self.customer = customer_identity
        self.room = rtc.Room()
        self.tap = Tap(None, sample_rate=voice_mode.INPUT_RATE)
        self._task: asyncio.Task[None] | None = None

    def token(self, settings: Settings, room: str) -> str:
        return (api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret)
                .with_identity(f"rec-{self.customer}").with_name("crosstalk recorder")
                .with_grants(api.VideoGrants(room_join=True, room=room, hidden=True, can_publish=False,
                                             can_publish_data=False)).to_jwt())

    async def start(self, settings: Settings, room: str, timeout: float) -> None:
        self.room.on("track_subscribed", self._on_track)
        await asyncio.wait_for(self.room.connect(settings.livekit_url, self.token(settings, room)), timeout)

    def _on_track(self, track: rtc.Track, pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        if p.identity == self.customer and track.kind == rtc.TrackKind.KIND_AUDIO and self._task is None:
            self._task = asyncio.ensure_future(self._read(track))

    async def _read(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=voice_mode.INPUT_RATE, num_channels=1,
                                 frame_size_ms=voice_mode.INPUT_FRAME_MS)
        try:
            async for ev in stream:
                self.tap.add(ev.frame, time.time())
        finally:
            await stream.aclose()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.room.disconnect()
