"""Voice mode's plan for one role: the TTS voice, speaking rate and language it speaks with, and how
it hears the peer (STT, or the speaker's own text where no offline STT exists for the peer's
language). Pure: the worker builds its session from it, the dispatcher validates ``batch.start``
with :func:`check` before any room exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import voices
from shared.config import Settings
from shared.contracts import HeardVia, Role
from shared.scenarios import Scenario


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


def check(scenario: Scenario, language: str, settings: Settings,
          roles: tuple[Role, ...] = ("customer", "support")) -> tuple[str, str] | None:
    """``(field, reason)`` if ``scenario`` cannot run in voice mode in ``language``, else None.

    ``roles``: the roles crosstalk voices (against a user's own agent, the customer only: the support
    role speaks with that agent's own voice)."""
    if not scenario.voice_mode:
        return "mode", f"scenario {scenario.id!r} disables voice mode (voice_mode: false); use mode 'text'"
    for role in roles:
        try:
            plan(scenario, role, language, settings)
        except voices.VoiceError as exc:
            where = "language" if exc.param == "language" else f"scenario {scenario.id!r} {role} voice"
            return ("language" if exc.param == "language" else "scenario"), f"{where}: {exc.reason}"
    return None
