"""One agent's live conversation in voice mode: the peer is heard through its audio track.

Same turn-taking as text mode (worker/lifecycle/turns.py), with what the room's audio adds:

- The listener's input for a turn is what its STT made of the peer's speech, cut by Silero VAD
  (``Agent.on_user_turn_completed`` -> :meth:`VoiceConversation.on_user_turn`), every segment of it
  (the model is asked with all of them, not the last one); where there is no
  STT for the peer's language offline (Hindi), the speaker's own text, taken once the speaker's
  audio has gone quiet in the room (``heard_via: "speaker_text"``).
- The speaker still sends its words and turn index on ``lk.chat`` once its speech has played out:
  the turn index keeps the count exact, and a VAD end of speech that comes before the speaker's
  turn is over (a pause inside it) is not taken for the end of the turn.
- The listener tells the speaker what it heard (``heard`` control message: the text, how, and
  where the speech lay on the room's timeline); the speaker then records the turn with those
  fields. The recording's time zero, the conversation's first audio, travels with every report.
- An end (``end_conversation``, ``max_turns``) waits for the last turn to be heard.
- A turn the STT heard as nothing (empty text) is reported as heard ``""`` (the sink counts it fully
  misheard) and answered as a person would: "sorry, I didn't catch that" in this role's language
  (worker/voice/speech.py ``say_again``), never a reply to an empty message nor silence.
- An end that would be ``ok`` is ``no_audio`` (failed, crosstalk's own fault: the dispatcher retries
  it) when this listener heard no speech at all from the peer's track although it heard the peer's
  turns, or when the peer heard none of this agent's turns: turns went by on text alone, which a
  voice test must not call completed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from livekit.agents import AgentSession
from livekit.agents.voice import room_io
from livekit.agents.voice.events import UserStateChangedEvent

from shared.log import kv
from shared.voiceplan import VoicePlan
from worker.lifecycle.lease import LeaseKeeper
from worker.lifecycle.reports import Reports
from worker.lifecycle.turns import End, Speak
from worker.pair.bridge import RoomBridge
from worker.pair.conversation import Conversation
from worker.voice import speech as voice_mode
from worker.voice.recorder import Tap

log = logging.getLogger("worker.job")

TEXT_WAIT_S = 4.0  # after a VAD end of speech, how long the speaker's end-of-turn message may take
HEARD_WAIT_S = 30.0  # how long a speaker waits for the listener's report before recording without it
STT_GRACE_S = 10.0  # speaker's turn over and quiet, but no transcript: hear what there is and go on


def _f(x: str | None) -> float | None:
    try:
        return float(x) if x not in (None, "") else None
    except ValueError:
        return None


class VoiceConversation(Conversation):
    def __init__(self, *, reports: Reports, bridge: RoomBridge, lease: LeaseKeeper | None, plan: VoicePlan,
                 min_silence_s: float) -> None:
        super().__init__(reports=reports, bridge=bridge, lease=lease)
        self.plan = plan
        self.min_silence_s = min_silence_s
        self.end_grace_s = 60.0  # a goodbye is spoken, then heard, before its turn is recorded
        self.tap: Tap | None = None  # set once the session listens (worker/pair/session.py)
        self.session: AgentSession | None = None  # set once the session runs (worker/pair/session.py)
        self._peer_heard_me: list[bool] = []  # per turn of mine the peer reported: did its tap hear speech
        self.origin: float | None = None  # the recording's time zero: the conversation's first audio
        self._texts: dict[int, asyncio.Future[str]] = {}  # the speaker's words per turn (lk.chat)
        self._reports: dict[int, asyncio.Future[dict[str, str]]] = {}  # what the listener heard, per turn
        self._heard: set[int] = set()
        self._parts: list[str] = []  # transcripts of the peer's current turn so far
        self._end_after: tuple[str, int] | None = None  # the peer ends after its turn n is heard
        self._starts = 0  # the VAD's starts of the peer's speech, and the parts of it transcribed
        self._completed = 0

    def _future(self, table: dict[int, asyncio.Future[Any]], turn: int) -> asyncio.Future[Any]:
        if turn not in table:
            table[turn] = asyncio.get_running_loop().create_future()
        return table[turn]

    def _see_origin(self, at: float | None) -> None:
        if at is not None and (self.origin is None or at < self.origin):
            self.origin = at

    # -- listening -----------------------------------------------------------------------

    async def listening(self, timeout: float) -> None:
        """Until the peer's track reaches this agent (its first frame, silent or not): only then
        does this agent announce it is ready, so no first word is lost to a late subscription."""
        deadline = time.monotonic() + timeout
        while self.tap is None or self.tap.start_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no audio from the peer's track within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def on_peer_text(self, session: AgentSession, ev: room_io.TextInputEvent) -> None:
        """The speaker's turn is over (its words and index, sent after its speech played out)."""
        turn = self.turn_of(ev)
        if turn is None or self.done.done():
            return
        fut = self._future(self._texts, turn)
        if not fut.done():
            fut.set_result(ev.text)
        self._track(self._hear_late(session, turn, ev.text))

    def on_user_state(self, ev: UserStateChangedEvent) -> None:
        if ev.new_state == "speaking":
            self._starts += 1

    async def on_user_turn(self, transcript: str) -> bool:
        """The VAD ended the peer's speech and the STT transcribed it: True to reply now."""
        self._completed += 1
        if transcript.strip():
            self._parts.append(transcript.strip())
        turn = self.turns.next_turn - 1
        if turn < 0 or turn in self._heard or self.done.done():
            return False
        try:
            await asyncio.wait_for(asyncio.shield(self._future(self._texts, turn)), TEXT_WAIT_S)
        except TimeoutError:
            return False  # a pause inside the speaker's turn: keep listening
        if self._starts > self._completed:
            return False  # it spoke on after this part: the next part's end of speech ends the turn
        heard = self._take_parts()
        if not await self._heard_turn(turn, heard, "stt"):
            return False
        if not heard:
            self.ask_again(self.session)
            return False
        if self.session is None:
            return True
        # The model is asked with every segment heard of the turn, not the hook's message (the last
        # segment only): livekit-agents drops the user message of a segment answered with StopResponse
        # ("ignore this turn", agent_activity.py), so the earlier segments never reached the model
        # (tests/e2e/test_ground_truth.py HEARD_IN_PARTS measured it).
        self.session.generate_reply(user_input=heard)
        return False

    def ask_again(self, session: AgentSession | None) -> None:
        """The STT heard nothing of the peer's turn: say so, as a person would, and let the peer repeat."""
        log.info("nothing heard of the peer's turn: asking again", extra=kv(room=self.room, role=self.role))
        if session is not None:
            session.say(voice_mode.say_again(self.plan.language))

    def _take_parts(self) -> str:
        heard, self._parts = " ".join(self._parts), []
        return heard

    async def _quiet(self, timeout: float) -> None:
        """Until the peer's audio has been quiet for the VAD's min silence (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.tap is not None and time.monotonic() < deadline:
            if self.tap.quiet_for(time.time()) >= self.min_silence_s:
                return
            await asyncio.sleep(0.05)

    async def _hear_late(self, session: AgentSession, turn: int, text: str) -> None:
        """Speaker-text hearing (no STT for the peer's language), and the STT path's fallback."""
        if self.plan.hears_via == "speaker_text":
            await self._quiet(timeout=30.0)
            if turn not in self._heard and await self._heard_turn(turn, text, "speaker_text"):
                session.generate_reply(user_input=text)
            return
        await self._quiet(timeout=30.0)
        await asyncio.sleep(STT_GRACE_S)
        if turn in self._heard or self.done.done() or turn != self.turns.next_turn - 1:
            return
        log.warning("no transcript for the peer's turn: going on with what was heard",
                    extra=kv(room=self.room, role=self.role, turn=turn))
        heard = self._take_parts()
        if await self._heard_turn(turn, heard, "stt"):
            if heard:
                session.generate_reply(user_input=heard)
            else:
                self.ask_again(session)

    async def _heard_turn(self, turn: int, heard: str, via: str) -> bool:
        """Report turn ``turn`` as heard to its speaker; True if this agent replies to it."""
        self._heard.add(turn)
        span = self.tap.take_span() if self.tap is not None else None
        if self.tap is not None and self.role == "support":
            self._see_origin(self.tap.first_speech_at)  # the customer speaks first: its first audio
        log.info("turn heard", extra=kv(room=self.room, role=self.role, turn=turn, via=via,
                                        after_speech_s=round(time.time() - span[1], 3) if span else None))
        await self.bridge.send_control(
            "heard", turn=str(turn), text=heard, via=via, start=str(span[0]) if span else "",
            end=str(span[1]) if span else "", origin=str(self.origin) if self.origin is not None else "")
        end = self.turns.heard(turn, at=time.time())
        if end is None and self._end_after is not None and turn >= self._end_after[1]:
            end = End(self._end_after[0], ok=True, mine=False)
        if end is not None:
            self.finish(end)
            return False
        return not self.done.done()

    def on_control(self, msg: dict[str, str], sender: str) -> None:
        kind = msg.get("kind")
        if kind == "heard":
            try:
                turn = int(msg.get("turn", ""))
            except ValueError:
                return
            self._see_origin(_f(msg.get("origin")))
            fut = self._future(self._reports, turn)
            if not fut.done():
                fut.set_result(msg)
            return
        if kind == "end":
            last = msg.get("turn")
            if last is not None and last.isdigit() and int(last) not in self._heard:
                # the goodbye is still being spoken: hear it (and report it) before leaving
                self._end_after = (str(msg.get("reason", "peer ended")), int(last))
                self._track(self._end_later(HEARD_WAIT_S))
                return
        super().on_control(msg, sender)

    def finish(self, end: End) -> None:
        super().finish(self.audio_check(end))

    def audio_check(self, end: End) -> End:
        """``end``, or ``no_audio`` if it is ok but the turns went by without audio in one direction."""
        if not end.ok:
            return end
        peer = "support" if self.role == "customer" else "customer"
        if self._heard and (self.tap is None or self.tap.first_speech_at is None):
            return End(f"no_audio: the {self.role} heard no speech on the {peer}'s track in "
                       f"{len(self._heard)} turn(s) it heard", ok=False, mine=end.mine)
        if self._peer_heard_me and not any(self._peer_heard_me):
            return End(f"no_audio: the {peer} heard no speech on the {self.role}'s track in "
                       f"{len(self._peer_heard_me)} turn(s)", ok=False, mine=end.mine)
        return end

    async def _end_later(self, after_s: float) -> None:
        await asyncio.wait({self.done}, timeout=after_s)
        if not self.done.done() and self._end_after is not None:
            self.finish(End(self._end_after[0], ok=True, mine=False))

    # -- speaking ------------------------------------------------------------------------

    async def _say(self, speak: Speak, text: str, now: float, first_token_s: float | None) -> None:
        # The speech has played out (the session adds the message then): say the turn is over,
        # wait for what the listener heard, then record the turn with it.
        end = self.turns.spoken(speak.turn)
        if end is not None:
            await self.bridge.send_control("end", reason=end.reason, turn=str(speak.turn))
        await self.bridge.send_turn(text, speak.turn)
        report: dict[str, str] = {}
        try:
            report = await asyncio.wait_for(asyncio.shield(self._future(self._reports, speak.turn)), HEARD_WAIT_S)
        except TimeoutError:
            log.warning("the listener did not report the turn", extra=kv(room=self.room, turn=speak.turn))
        start, stop, origin = _f(report.get("start")), _f(report.get("end")), self.origin
        if report:
            self._peer_heard_me.append(start is not None)
        # the session adds a message once it has played out: turn 0 started when its reply was asked
        # for (the customer's generate_reply), not its first token before that
        started_at = speak.started_at if speak.turn > 0 else min(self.turns.heard_at, speak.started_at)
        via = report.get("via")
        await self.reports.turn(
            speak.turn, text, started_at=started_at, ended_at=now, first_token_s=first_token_s,
            audio_start_s=start - origin if start is not None and origin is not None else None,
            audio_end_s=stop - origin if stop is not None and origin is not None else None,
            heard_text=report.get("text") if report else None,
            heard_via=via if via in ("stt", "speaker_text") else None)  # type: ignore[arg-type]
        if end is not None:
            self.finish(end)
