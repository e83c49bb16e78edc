"""The scenario library: personas and goals per role, and a script for the offline model.

Scenarios are JSON files in ``shared/scenarios/`` (add one to add a scenario);
``CROSSTALK_SCENARIO_DIR`` adds a folder of your own. The default scenario is
``en-account-help``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec

from shared import config
from shared.contracts import ID_PATTERN, Role

DEFAULT_SCENARIO = "en-account-help"
END_TOOL = "end_conversation"
_BUILTIN = Path(__file__).with_name("scenarios")


class Persona(msgspec.Struct, frozen=True):
    name: str
    persona: str
    goal: str


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


class ScenarioError(ValueError):
    """A scenario file that cannot be used: which file, which field, and why."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        super().__init__(f"{source}: {field}: {reason}")
        self.source, self.field, self.reason = source, field, reason


def decode_scenario(data: bytes, source: str) -> Scenario:
    """One scenario file's bytes as a :class:`Scenario`; :class:`ScenarioError` names the field if not."""
    import re

    from shared.codec import decode

    try:
        sc = decode(data, Scenario, max_bytes=1 << 20)
    except ValueError as exc:  # ContractError: the field and the reason
        raise ScenarioError(source, getattr(exc, "field", "$"), getattr(exc, "reason", str(exc))) from None
    if not re.match(ID_PATTERN, sc.id):
        raise ScenarioError(source, "id", f"{sc.id!r} must match {ID_PATTERN}")
    missing = [r for r in ("customer", "support") if r not in sc.roles]
    if missing:
        raise ScenarioError(source, "roles", f"needs a persona for both roles, missing {', '.join(missing)}")
    if sc.script and sc.script[0].role != "customer":
        raise ScenarioError(source, "script", "the customer speaks first")
    return sc


@lru_cache(maxsize=1)
def library() -> dict[str, Scenario]:
    folders = [_BUILTIN]
    extra = config.load().scenario_dir
    if extra is not None:
        folders.append(extra)
    out: dict[str, Scenario] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            sc = decode_scenario(path.read_bytes(), str(path))
            out[sc.id] = sc
    return out


def get(scenario_id: str) -> Scenario:
    return library()[scenario_id]
