"""The scenario library: personas and goals per role, and a script for the offline model.

Scenarios are JSON files in ``shared/scenarios/`` (add one to add a scenario);
``CROSSTALK_SCENARIO_DIR`` adds a folder of your own. The default scenario is
``en-account-help``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import msgspec

from shared import config
from shared.contracts import ID_PATTERN, Role

DEFAULT_SCENARIO = "en-account-help"
END_TOOL = "end_conversation"
_BUILTIN = Path(__file__).with_name("scenarios")


class Persona(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    persona: str
    goal: str
    # voice mode: the TTS voice (a name from shared/voices.py; default: the language's first),
    # speaking rate (1.0 = the voice's own) and spoken language (default: the scenario's)
    voice: str | None = None
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    language: str | None = None


class ScriptLine(msgspec.Struct, frozen=True):
    role: Role
    text: str
    end: bool = False


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    title: str
    language: str
    roles: dict[Role, Persona]
    script: list[ScriptLine]
    # LiveKit's scenario fields (``lk agent simulate`` / ``SimulationDispatch.scenario``):
    # handed to an agent under test; ``label`` defaults to ``title``.
    label: str = ""
    agent_expectations: str = ""
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    userdata: dict[str, Any] = msgspec.field(default_factory=dict)
    # False: this scenario is text only (batch.start with mode "voice" is refused)
    voice_mode: bool = True

    @property
    def display_label(self) -> str:
        return self.label or self.title

    def instructions(self, role: Role, language: str | None = None) -> str:
        """System prompt for ``role``; the marker line lets the scripted model find its script."""
        p = self.roles[role]
        peer = self.roles["support" if role == "customer" else "customer"]
        lang = language or self.language
        return (
            f"[crosstalk scenario={self.id} role={role} lang={lang}]\n"
            f"{p.persona}\nYour goal: {p.goal}\n"
            f"You are talking with {peer.name}. Reply in language '{lang}', one short conversational turn at a time. "
            f"When the conversation has reached its natural end, call the {END_TOOL} tool."
        )

    def lines_for(self, role: Role) -> list[ScriptLine]:
        return [line for line in self.script if line.role == role]


_dec = msgspec.json.Decoder(Scenario)


@lru_cache(maxsize=1)
def library() -> dict[str, Scenario]:
    import re

    folders = [_BUILTIN]
    extra = config.load().scenario_dir
    if extra is not None:
        folders.append(extra)
    out: dict[str, Scenario] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            sc = _dec.decode(path.read_bytes())
            if not re.match(ID_PATTERN, sc.id):
                raise ValueError(f"{path}: id {sc.id!r} must match {ID_PATTERN}")
            if sc.script and sc.script[0].role != "customer":
                raise ValueError(f"{path}: the customer speaks first")
            out[sc.id] = sc
    return out


def get(scenario_id: str) -> Scenario:
    return library()[scenario_id]
