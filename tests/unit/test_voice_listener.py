"""The voice listener as a person would be (worker/pair/voice_conversation.py, worker/simulator/voice_conversation.py):
a turn its STT heard as nothing is answered "sorry, I didn't catch that" in its own language, never
with an empty message or silence; a call whose turns went by without audio is not completed.

Pure: the conversation runs with in-memory stand-ins for the session, the bridge and the reports.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from livekit import rtc

import worker.pair.voice_conversation as vc
from shared.voiceplan import VoicePlan
from worker.lifecycle.turns import End
from worker.pair.voice_conversation import VoiceConversation
from worker.simulator.voice_conversation import SimVoiceConversation
from worker.voice import speech as voice_mode
from worker.voice.recorder import Tap

RATE = 16000


class Session:
    """What the listener asks of its ``AgentSession``."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.replies: list[str | None] = []

    def say(self, text: str) -> None:
        self.said.append(text)

    def generate_reply(self, user_input: str | None = None) -> None:
        self.replies.append(user_input)


class Bridge:
    def __init__(self) -> None:
        self.controls: list[tuple[str, dict[str, str]]] = []

    async def send_control(self, kind: str, **fields: str) -> None:
        self.controls.append((kind, fields))


def listener(role: str = "support", language: str = "en") -> tuple[VoiceConversation, Session, Bridge]:
    reports: Any = SimpleNamespace(role=role, room="r1", meta=SimpleNamespace(max_turns=8))
    bridge = Bridge()
    plan = VoicePlan(voice="v", speed=1.0, language=language, hears_via="stt", peer_language="en")
    conv = VoiceConversation(reports=reports, bridge=bridge, lease=None, plan=plan,  # type: ignore[arg-type]
                             min_silence_s=0.1)
    session = Session()
    conv.session = session  # type: ignore[assignment]
    return conv, session, bridge


def peer_turn_over(conv: VoiceConversation, turn: int, text: str) -> None:
    """The speaker's words for ``turn`` arrived on lk.chat (its speech played out)."""
    conv._future(conv._texts, turn).set_result(text)


def tap_with(loud: bool) -> Tap:
    tap = Tap(None, sample_rate=RATE)
    n = RATE // 10
    x = (np.sin(np.arange(n) / RATE * 2 * np.pi * 300) * 5000).astype(np.int16) if loud else np.zeros(n, np.int16)
    tap.add(rtc.AudioFrame(x.tobytes(), RATE, 1, n), 10.0)
    return tap


@pytest.mark.parametrize(("language", "phrase"), [
    ("en", "Sorry, I didn't catch that. Could you say it again?"),
    ("hi", voice_mode.SAY_AGAIN["hi"]),
    ("hi-IN", voice_mode.SAY_AGAIN["hi"]),
    ("fr", "Sorry, I didn't catch that. Could you say it again?"),
])
def test_the_phrase_is_in_the_listeners_language(language: str, phrase: str) -> None:
    assert voice_mode.say_again(language) == phrase
    assert "माफ़" in voice_mode.SAY_AGAIN["hi"]  # Devanagari, spoken by the Hindi voice


async def test_an_empty_transcript_is_reported_heard_as_nothing_and_asked_again() -> None:
    conv, session, bridge = listener(language="hi")
    peer_turn_over(conv, 0, "my order never arrived")
    assert await conv.on_user_turn("   ") is False  # no model reply to an empty message
    assert session.said == [voice_mode.SAY_AGAIN["hi"]] and session.replies == []
    kind, fields = bridge.controls[0]
    assert kind == "heard" and fields["turn"] == "0" and fields["text"] == "" and fields["via"] == "stt"


async def test_a_turn_heard_in_segments_is_answered_with_all_of_them() -> None:
    """The VAD cut the peer's turn in two: the model is asked with both segments, not the last one."""
    conv, session, bridge = listener()
    conv.on_user_state(SimpleNamespace(new_state="speaking"))  # type: ignore[arg-type]
    conv.on_user_state(SimpleNamespace(new_state="speaking"))  # type: ignore[arg-type]
    peer_turn_over(conv, 0, "Hello. So I am locked out of my account.")
    assert await conv.on_user_turn("Hello.") is False  # it spoke on: not the end of its turn
    assert await conv.on_user_turn("So I am locked out of my account.") is False  # answered here, not by the hook
    assert session.replies == ["Hello. So I am locked out of my account."] and session.said == []
    assert bridge.controls[0][1]["text"] == "Hello. So I am locked out of my account."


async def test_no_transcript_at_all_is_asked_again_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The STT never returned (livekit-agents ends no user turn on an empty transcript): after the
    grace the turn is heard as nothing and the listener asks again, where it used to answer nothing."""
    monkeypatch.setattr(vc, "STT_GRACE_S", 0.0)
    conv, session, bridge = listener()
    await conv._hear_late(session, 0, "my order never arrived")  # type: ignore[arg-type]
    assert session.said == [voice_mode.say_again("en")] and session.replies == []
    assert bridge.controls[0][1]["text"] == ""


async def test_an_ok_end_without_the_peers_audio_is_no_audio() -> None:
    conv, _, _ = listener(role="support")
    conv._heard = {0, 2}
    conv.tap = tap_with(loud=False)  # frames came, but never speech
    end = conv.audio_check(End("max_turns", ok=True, mine=True))
    assert end.reason.startswith("no_audio: the support heard no speech on the customer's track") and not end.ok
    conv.tap = tap_with(loud=True)
    assert conv.audio_check(End("max_turns", ok=True, mine=True)) == End("max_turns", ok=True, mine=True)
    # the peer's reports of this agent's turns: none located any speech
    conv._peer_heard_me = [False, False]
    assert conv.audio_check(End("max_turns", ok=True, mine=True)).reason.startswith(
        "no_audio: the customer heard no speech on the support's track")
    conv._peer_heard_me = [False, True]
    assert conv.audio_check(End("max_turns", ok=True, mine=True)).ok
    # a failed end keeps its own reason
    assert conv.audio_check(End("agent_left: customer", ok=False, mine=True)).reason == "agent_left: customer"


async def test_finish_applies_the_audio_check() -> None:
    conv, _, _ = listener(role="customer")
    conv._heard = {1}
    conv.finish(End("end_conversation: customer", ok=True, mine=True))
    assert conv.done.result().reason.startswith("no_audio: the customer heard no speech")


def sim(**kw: Any) -> Any:
    """A stand-in for SimVoiceConversation's state, to run its methods on."""
    plan = VoicePlan(voice="v", speed=1.0, language=kw.pop("language", "en"), hears_via="stt", peer_language="en")
    base: dict[str, Any] = dict(session=Session(), plan=plan, room="r1", target_turns=0, tap=None, mine=None,
                                _spoken=0, link=SimpleNamespace(agent_name="acme"))
    return SimpleNamespace(**{**base, **kw})


def test_the_caller_asks_again_when_it_heard_nothing_of_the_target() -> None:
    me = sim(language="hi")
    SimVoiceConversation.answer(me, None, "")  # type: ignore[arg-type]
    SimVoiceConversation.answer(me, None, None)  # type: ignore[arg-type]
    SimVoiceConversation.answer(me, None, "where is my order")  # type: ignore[arg-type]
    assert me.session.said == [voice_mode.SAY_AGAIN["hi"]] * 2 and me.session.replies == ["where is my order"]


def test_a_target_that_answers_only_in_text_is_target_silent_and_a_silent_caller_no_audio() -> None:
    ok = End("end_conversation: support", ok=True, mine=True)
    me = sim(target_turns=3, tap=tap_with(loud=False), mine=tap_with(loud=True), _spoken=3)
    end = SimVoiceConversation.audio_check(me, ok)
    assert end.reason.startswith("target_silent: agent 'acme' answered 3 turn(s) in text") and not end.ok
    me = sim(target_turns=3, tap=tap_with(loud=True), mine=tap_with(loud=False), _spoken=3)
    assert SimVoiceConversation.audio_check(me, ok).reason.startswith("no_audio: the hidden recorder")
    me = sim(target_turns=3, tap=tap_with(loud=True), mine=tap_with(loud=True), _spoken=3)
    assert SimVoiceConversation.audio_check(me, ok) == ok
    assert SimVoiceConversation.audio_check(sim(), ok) == ok  # nothing said yet: nothing to miss


class TargetReports:
    """The support side's reports (under the lease held for the target): the turns recorded."""

    lease = None

    def __init__(self) -> None:
        self.turns: list[dict[str, Any]] = []

    async def turn(self, turn: int, text: str, **kw: Any) -> None:
        self.turns.append({"turn": turn, "text": text, **kw})


def speak(tap: Tap, seconds: float, loud: bool, at: float) -> None:
    """``seconds`` of the target's audio reaching the tap (speech or silence), arrived by wall time ``at``."""
    n = int(seconds * RATE)
    x = (np.sin(np.arange(n) / RATE * 2 * np.pi * 300) * 5000).astype(np.int16) if loud else np.zeros(n, np.int16)
    tap.add(rtc.AudioFrame(x.tobytes(), RATE, 1, n), at)


async def test_an_unprompted_turn_takes_its_own_audio_and_transcripts_never_the_next_answers() -> None:
    """A greeting (turn 0) and a follow-up the customer's STT heard while listening: each is recorded
    with its own span and heard text; the answer after each holds only its own (worker/simulator/voice_conversation.py)."""
    from worker.simulator.target_reply import Reply

    link = SimpleNamespace(agent_name="acme", room=None)
    reports: Any = SimpleNamespace(role="customer", room="r1", meta=SimpleNamespace(max_turns=8))
    plan = VoicePlan(voice="v", speed=1.0, language="en", hears_via="stt", peer_language="en")
    conv = SimVoiceConversation(plan=plan, min_silence_s=0.1, reports=reports, link=link, keeper=None, reply_s=30.0)
    recorded = TargetReports()
    conv.target = recorded  # type: ignore[assignment]
    conv.tap = tap = Tap(None, sample_rate=RATE)
    t0 = 1000.0
    speak(tap, 2.0, True, t0 + 2.0)  # the greeting, 0-2 s
    conv._starts, conv._completed, conv._parts = 1, 1, ["welcome to acme"]
    conv.on_unprompted(Reply(t0, "speaking"))
    conv._early[0].closed("s0", "Welcome to Acme.", t0 + 2.0)  # type: ignore[index]
    assert await conv.record_early() == "welcome to acme"
    speak(tap, 1.0, False, t0 + 3.0)
    speak(tap, 1.5, True, t0 + 4.5)  # the answer, 3-4.5 s
    conv._starts, conv._completed, conv._parts = 2, 2, ["you are verified"]
    answer = Reply(t0 + 2.5, "thinking")
    answer.closed("s1", "You are verified.", t0 + 4.5)
    conv.on_reply(answer)
    assert conv._waiter is not None
    await conv._waiter  # heard out: its audio quiet, its stretches transcribed
    speak(tap, 1.0, False, t0 + 5.5)
    speak(tap, 0.5, True, t0 + 6.0)  # a follow-up, 5.5-6 s, while the customer is about to answer
    conv._starts, conv._completed, conv._parts = 3, 3, [*conv._parts, "anything else"]
    follow = Reply(t0 + 5.5, "speaking")
    follow.closed("s2", "Anything else?", t0 + 6.0)
    conv.on_unprompted(follow)
    await conv._waiter
    greeting, reply, more = recorded.turns
    assert (greeting["unprompted"], reply["unprompted"], more["unprompted"]) == (True, False, True)
    assert (greeting["heard_text"], reply["heard_text"], more["heard_text"]) == (
        "welcome to acme", "you are verified", "anything else")
    assert (greeting["audio_start_s"], greeting["audio_end_s"]) == pytest.approx((0.0, 2.0))  # time zero: the greeting
    assert (reply["audio_start_s"], reply["audio_end_s"]) == pytest.approx((3.0, 4.5))
    assert (more["audio_start_s"], more["audio_end_s"]) == pytest.approx((5.5, 6.0))
