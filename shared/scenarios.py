"""The scenario library: personas and goals per role, and a script for the offline model.

Scenarios are LiveKit scenario files (``scenarios.yaml`` as ``lk agent simulate`` reads it,
with crosstalk's ``crosstalk:`` extension per scenario; see shared/scenario_files.py) in
``shared/scenarios/``; ``CROSSTALK_SCENARIO_DIR`` adds a folder of your own (``*.yaml``,
``*.yml``, and the older one-scenario ``*.json`` files). The default scenario is
``en-account-help``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from shared import config
from shared.contracts import ID_PATTERN, Role

DEFAULT_SCENARIO = "en-account-help"
END_TOOL = "end_conversation"
# The line (after the marker) that carries a role's script to the scripted model (services/model/core.py).
SCRIPT_PREFIX = "[crosstalk script]"
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


class ToolCheck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tool the agent must have called: by name, optionally by role and with these arguments (a subset)."""

    name: str
    by: Role | None = None
    arguments: dict[str, Any] | None = None


class LatencyCheck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Latency limits in seconds over the agent's turns; a limit whose field no turn recorded is inconclusive.

    ``max`` / ``p95``: limits on any numeric field of a transcript line (voice mode's timing
    fields, e.g. ``{"e2e_latency_s": 1.5}``), checked when the turns carry that field.
    """

    first_token_s_max: float | None = None
    first_token_s_p95: float | None = None
    total_s_max: float | None = None
    max: dict[str, float] = {}
    p95: dict[str, float] = {}


class Checks(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Deterministic checks of a conversation (services/judge/checks.py); all optional.

    ``must_mention`` / ``must_not_say``: phrases (case-insensitive) the support agent's turns
    must contain / never contain. ``ended_by``: who ended the call (``either``: one of them, by
    the end tool). ``within_turns``: at most this many turns. ``language``: every turn is
    written in this language's script (``true``: the scenario's language).
    """

    must_mention: list[str] = []
    must_not_say: list[str] = []
    tool_called: list[ToolCheck] = []
    ended_by: Literal["customer", "support", "either"] | None = None
    within_turns: Annotated[int, msgspec.Meta(ge=1)] | None = None
    language: str | bool | None = None
    latency: LatencyCheck | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f) not in (None, [], False) for f in self.__struct_fields__)


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
    # crosstalk's extensions (the ``crosstalk:`` key of a scenario file entry)
    checks: Checks = Checks()
    max_turns: int | None = None
    # The entry as written in its file (LiveKit fields, unknown fields and ``crosstalk:`` kept),
    # what a batch carries to the worker; None for the older JSON scenarios.
    doc: dict[str, Any] | None = None
    # Write the role's script lines into the instructions (after the marker), for a scripted
    # model that does not have this scenario in its library (an inline or uploaded scenario).
    embed_script: bool = False
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
        script = ""
        if self.embed_script:
            lines = [{"text": line.text, "end": line.end} for line in self.lines_for(role)]
            script = f"{SCRIPT_PREFIX} {json.dumps(lines, ensure_ascii=False)}\n"
        head = f"[crosstalk scenario={self.id} role={role} lang={lang}]\n{script}"
        if role == "customer":  # the caller: one prompt builder for every model
            from shared import caller_prompt

            return head + caller_prompt.build(p, peer.name, self.userdata, lang)
        goal = f"Your goal: {p.goal}\n" if p.goal else ""
        return (
            f"{head}{p.persona}\n{goal}"
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
    """Every scenario of the built-in folder and CROSSTALK_SCENARIO_DIR, by id (a later one wins).

    A file with errors raises ``ValueError`` naming the file, line and field
    (:class:`shared.scenario_files.ScenarioFileError`).
    """
    from shared import scenario_files

    folders = [_BUILTIN]
    extra = config.load().scenario_dir
    if extra is not None:
        folders.append(extra)
    out: dict[str, Scenario] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.suffix in (".yaml", ".yml"):
                out.update((sc.id, sc) for sc in scenario_files.load_path(path).scenarios)
                continue
            if path.suffix != ".json":
                continue
            sc = decode_scenario(path.read_bytes(), str(path))
            out[sc.id] = sc
    return out


def get(scenario_id: str) -> Scenario:
    return library()[scenario_id]
