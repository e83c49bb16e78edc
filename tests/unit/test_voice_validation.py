"""batch.start in voice mode: what the dispatcher refuses, naming the field (services/dispatcher/validate.py,
shared/voiceplan.py with the voice catalogue shared/voices.py)."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest

from services.dispatcher.validate import Rejection, validate
from shared.config import Settings
from shared.contracts import BatchSpec, StartBatch
from shared.scenarios import Persona, Scenario, library

SETTINGS = Settings()
BASE = library()["en-account-help"]


def scenario(sid: str, *, language: str = "en", voice_mode: bool = True, **customer: object) -> Scenario:
    roles = dict(BASE.roles)
    roles["customer"] = msgspec.structs.replace(roles["customer"], **customer)  # type: ignore[arg-type]
    return msgspec.structs.replace(BASE, id=sid, language=language, voice_mode=voice_mode, roles=roles)


SCENARIOS = {s.id: s for s in [
    *library().values(),
    scenario("bad-voice", voice="en-nobody"),
    scenario("wrong-voice", voice="hi-espeak"),
    scenario("french", language="fr"),
    scenario("text-only", voice_mode=False),
    scenario("espeak-en", voice="en-espeak", speed=1.3),
    msgspec.structs.replace(BASE, id="bad-support-voice", roles={
        **BASE.roles, "support": msgspec.structs.replace(BASE.roles["support"], voice="en-nobody")}),
]}


def start(settings: Settings = SETTINGS, **cmd: object) -> BatchSpec | Rejection:
    return validate(StartBatch(mode="voice", **cmd), settings, SCENARIOS, received_at=1_795_000_000.0,  # type: ignore[arg-type]
                    seed="1:1")


@pytest.mark.parametrize(("sid", "field", "fragment"), [
    ("bad-voice", "scenario", "customer voice: unknown voice 'en-nobody' (known: en-joe"),
    ("wrong-voice", "scenario", "'hi-espeak' speaks hi, not en"),
    ("french", "language", "no offline voice speaks 'fr'"),
    ("text-only", "mode", "scenario 'text-only' disables voice mode"),
])
def test_voice_mode_refusals_name_the_field_and_the_reason(sid: str, field: str, fragment: str) -> None:
    got = start(scenario=sid)
    assert isinstance(got, Rejection), got
    assert got.field == field and fragment in got.reason, got


def test_the_same_scenarios_run_in_text_mode_and_good_voices_pass() -> None:
    for sid in ("bad-voice", "french", "text-only"):
        assert isinstance(validate(StartBatch(scenario=sid), SETTINGS, SCENARIOS, received_at=0.0, seed="x"),
                          BatchSpec)
    for sid in ("en-account-help", "hi-account-help", "espeak-en"):
        got = start(scenario=sid)
        assert isinstance(got, BatchSpec) and got.mode == "voice", got


def test_with_real_speech_any_voice_name_goes_to_the_provider() -> None:
    got = start(replace(SETTINGS, real_speech=True, real_model=True), scenario="bad-voice")
    assert isinstance(got, BatchSpec)


def test_persona_voice_fields_are_checked_on_decode() -> None:
    with pytest.raises(msgspec.ValidationError, match="speed"):
        msgspec.json.decode(b'{"name": "a", "persona": "b", "goal": "c", "speed": 9}', type=Persona)


def test_against_a_target_agent_only_the_customers_voice_is_crosstalks_to_check() -> None:
    """The support role speaks with the user's agent's own voice: its scenario voice is not used."""
    refused = start(scenario="bad-support-voice")
    assert isinstance(refused, Rejection) and "support voice: unknown voice 'en-nobody'" in refused.reason, refused
    got = start(scenario="bad-support-voice", target_agent="acme")
    assert isinstance(got, BatchSpec) and got.target_agent == "acme", got
    bad = start(scenario="bad-voice", target_agent="acme")  # the customer's voice is still crosstalk's
    assert isinstance(bad, Rejection) and bad.field == "scenario", bad
