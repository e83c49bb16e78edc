"""LiveKit scenario files (``scenarios.yaml`` as ``lk agent simulate`` reads it) as crosstalk scenarios.

The format is LiveKit's (livekit-cli ``cmd/lk/simulate.go``, ``scenariosFile``)::

    name: support-regressions          # top level: name (and id), any other key kept
    scenarios:
      - label: Locked out               # LiveKit's fields, loaded unchanged
        instructions: |                 # the simulated caller (crosstalk's customer role)
          You are Raj ...
        agent_expectations: |           # what the agent under test must do (the LLM judge's criteria)
          - Verifies the caller ...
        tags: {team: payments}          # a string map
        userdata: {account: {tier: gold}}  # any mapping, handed to the agent under test
        crosstalk:                      # crosstalk's extension; LiveKit ignores it
          id: en-account-help
          language: en
          max_turns: 8
          roles: {customer: {name, persona, goal}, support: {name, persona, goal}}
          checks: {must_mention: [...], ended_by: support, ...}   # shared.scenarios.Checks
          script: [{role: customer, text: ...}, {role: support, text: ..., end: true}]

Unknown fields of LiveKit's part are kept (in ``Scenario.doc``) and never rejected; unknown
fields inside ``crosstalk:`` are errors (a typo there must not silently drop a check). Every
error names its line (files) or field path (inline lists), and all errors are reported at once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import msgspec

from shared.contracts import ID_PATTERN, Role
from shared.scenarios import Checks, Persona, Scenario, ScriptLine
from shared.yaml_marks import Path as FieldPath
from shared.yaml_marks import Problem, field_name, line_of
from shared.yaml_marks import load as load_yaml

EXTENSION = "crosstalk"
LANGUAGE_PATTERN = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?\Z"
DEFAULT_SUPPORT = "You are a customer support agent. Help the caller politely, correctly and briefly."
MAX_SCENARIOS = 1000


class ScenarioFileError(ValueError):
    """Every problem of one scenario document, each with its line and field."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


class RoleExt(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str = ""
    persona: str = ""
    goal: str = ""
    # voice mode (shared/scenarios.Persona): TTS voice name, speaking rate, spoken language
    voice: str | None = None
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    language: Annotated[str, msgspec.Meta(pattern=LANGUAGE_PATTERN)] | None = None


class Extension(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)] | None = None
    title: str | None = None
    language: Annotated[str, msgspec.Meta(pattern=LANGUAGE_PATTERN)] = "en"
    max_turns: Annotated[int, msgspec.Meta(ge=1, le=200)] | None = None
    roles: dict[Role, RoleExt] = {}
    checks: Checks = Checks()
    script: list[ScriptLine] = []
    voice_mode: bool = True  # false: text only (batch.start with mode "voice" is refused)


class ScenarioFile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    id: str | None
    scenarios: list[Scenario]
    doc: dict[str, Any]


def load_path(path: Path) -> ScenarioFile:
    return load_text(path.read_text(encoding="utf-8"), str(path), default_name=path.stem)


def load_text(text: str, source: str = "<scenarios>", *, default_name: str = "scenarios") -> ScenarioFile:
    """A whole ``scenarios.yaml``; :class:`ScenarioFileError` with every problem, each with its line."""
    marked = load_yaml(text)
    problems = list(marked.problems)
    doc = marked.value
    if problems and doc is None:
        raise ScenarioFileError(source, problems)
    if not isinstance(doc, dict):
        raise ScenarioFileError(source, [Problem(1, "", "must be a mapping with a 'scenarios' list")])
    for key in ("name", "id"):
        if key in doc and not isinstance(doc[key], str):
            problems.append(Problem(line_of(marked.lines, (key,)), key, "must be a string"))
    entries = doc.get("scenarios")
    if not isinstance(entries, list) or not entries:
        problems.append(Problem(line_of(marked.lines, ("scenarios",)), "scenarios", "must be a non-empty list"))
        raise ScenarioFileError(source, problems)
    scenarios = _entries(entries, ("scenarios",), problems, lambda p: line_of(marked.lines, p))
    if problems:
        raise ScenarioFileError(source, sorted(problems, key=lambda p: (p.line or 0, p.field)))
    name = doc["name"] if isinstance(doc.get("name"), str) else default_name
    return ScenarioFile(name=name, id=doc.get("id"), scenarios=scenarios, doc=doc)


def from_entries(entries: Any, field: str = "scenarios") -> list[Scenario]:
    """An inline list of scenario entries (``batch.start``'s ``scenarios``); errors name ``scenarios[i].field``."""
    problems: list[Problem] = []
    if not isinstance(entries, list) or not entries:
        raise ScenarioFileError(field, [Problem(None, field, "must be a non-empty list of scenarios")])
    out = _entries(entries, (field,), problems, lambda p: None)
    if problems:
        raise ScenarioFileError(field, problems)
    return out


def from_doc(doc: dict[str, Any], *, embed_script: bool = False) -> Scenario:
    """One entry (as a batch carries it) back to a :class:`Scenario`; ScenarioFileError if it is not one."""
    problems: list[Problem] = []
    sc = _entry(doc, ("scenario",), problems, lambda p: None)
    if sc is None or problems:
        raise ScenarioFileError("scenario", problems or [Problem(None, "scenario", "not a scenario")])
    return msgspec.structs.replace(sc, embed_script=embed_script)


def to_doc(sc: Scenario) -> dict[str, Any]:
    """The entry a batch carries for ``sc``: its file entry, or one built from an older JSON scenario."""
    if sc.doc is not None:
        return sc.doc
    ext: dict[str, Any] = {
        "id": sc.id, "title": sc.title, "language": sc.language,
        "roles": {r: msgspec.to_builtins(p) for r, p in sc.roles.items()},
        "script": msgspec.to_builtins(sc.script),
    }
    if sc.max_turns is not None:
        ext["max_turns"] = sc.max_turns
    if sc.checks:
        ext["checks"] = msgspec.to_builtins(sc.checks)
    return {"label": sc.display_label, "instructions": sc.roles["customer"].persona,
            "agent_expectations": sc.agent_expectations, "tags": dict(sc.tags), "userdata": dict(sc.userdata),
            EXTENSION: ext}


# --------------------------------------------------------------------------- one entry


def _entries(entries: list[Any], base: FieldPath, problems: list[Problem], line: Any) -> list[Scenario]:
    if len(entries) > MAX_SCENARIOS:
        problems.append(Problem(line(base), field_name(base), f"at most {MAX_SCENARIOS} scenarios, got {len(entries)}"))
        return []
    out: list[Scenario] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        sc = _entry(entry, (*base, i), problems, line)
        if sc is None:
            continue
        if sc.id in seen:
            problems.append(Problem(line((*base, i)), field_name((*base, i)),
                                    f"id {sc.id!r} is already used by {field_name((*base, seen[sc.id]))}; "
                                    f"set crosstalk.id to tell them apart"))
            continue
        seen[sc.id] = i
        out.append(sc)
    return out


def _entry(entry: Any, path: FieldPath, problems: list[Problem], line: Any) -> Scenario | None:
    def bad(sub: FieldPath, reason: str) -> None:
        problems.append(Problem(line((*path, *sub)), field_name((*path, *sub)), reason))

    if not isinstance(entry, dict):
        bad((), "must be a mapping (label, instructions, agent_expectations, tags, userdata)")
        return None
    before = len(problems)
    for key in ("label", "instructions", "agent_expectations", "id"):
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            bad((key,), f"must be a string, got {type(entry[key]).__name__}")
    tags = entry.get("tags") or {}
    if not isinstance(tags, dict):
        bad(("tags",), "must be a mapping of strings")
        tags = {}
    for k, v in tags.items():
        if not isinstance(v, str):
            bad(("tags", str(k)), f"tag values must be strings (quote it: \"{v}\"), got {type(v).__name__}")
    userdata = entry.get("userdata") or {}
    if not isinstance(userdata, dict):
        bad(("userdata",), "must be a mapping")
        userdata = {}
    ext = _extension(entry.get(EXTENSION), (*path, EXTENSION), problems, line)
    label: str = _text(entry, "label")
    instructions: str = _text(entry, "instructions")
    roles = ext.roles if ext is not None else {}
    if not label.strip() and not (ext and ext.title):
        bad(("label",), "is required (a short name for the scenario)")
    if not instructions.strip() and not roles.get("customer", RoleExt()).persona:
        bad(("instructions",), "is required (what the simulated caller does)")
    if ext is None or len(problems) > before:
        return None
    sid = ext.id or _id_from(entry.get("id")) or slug(label)
    if not sid:
        bad(("label",), f"gives no usable id; set {EXTENSION}.id (must match [a-z0-9][a-z0-9-]{{0,63}})")
        return None
    if ext.script and ext.script[0].role != "customer":
        bad((EXTENSION, "script", 0, "role"), "the customer speaks first")
        return None
    expectations = _text(entry, "agent_expectations")
    cust, supp = roles.get("customer", RoleExt()), roles.get("support", RoleExt())
    return Scenario(
        id=sid, title=ext.title or label, language=ext.language,
        roles={
            "customer": Persona(name=cust.name or "Caller", persona=cust.persona or instructions.strip(),
                                goal=cust.goal, voice=cust.voice, speed=cust.speed, language=cust.language),
            "support": Persona(name=supp.name or "Support agent", persona=supp.persona or DEFAULT_SUPPORT,
                               goal=supp.goal or expectations.strip(), voice=supp.voice, speed=supp.speed,
                               language=supp.language),
        },
        script=list(ext.script), label=label, agent_expectations=expectations, tags=dict(tags),
        userdata=dict(userdata), checks=ext.checks, max_turns=ext.max_turns, doc=entry,
        voice_mode=ext.voice_mode,
    )


def _extension(raw: Any, path: FieldPath, problems: list[Problem], line: Any) -> Extension | None:
    if raw is None:
        return Extension()
    try:
        return msgspec.convert(raw, Extension)
    except msgspec.ValidationError as exc:
        text = str(exc)
        reason, _, where = text.partition(" - at `$")
        sub = _msgspec_path(where.rstrip("`"))
        if reason.startswith("Object missing required field `"):
            sub = (*sub, reason.split("`")[1])
            reason = "is required"
        elif reason.startswith("Object contains unknown field `"):
            name = reason.split("`")[1]
            sub = (*sub, name)
            known = ", ".join(_known_fields(sub[:-1]))
            reason = f"unknown field {name!r} in {EXTENSION}:" + (f" (known: {known})" if known else "")
        problems.append(Problem(line((*path, *sub)), field_name((*path, *sub)), reason))
        return None


def _known_fields(sub: FieldPath) -> tuple[str, ...]:
    names = [p for p in sub if isinstance(p, str)]
    table: dict[str, tuple[str, ...]] = {"": Extension.__struct_fields__, "checks": Checks.__struct_fields__,
                                         "script": ScriptLine.__struct_fields__}
    return table.get(names[-1] if names else "", ())


def _msgspec_path(where: str) -> FieldPath:
    """msgspec's ``.checks.tool_called[0].name`` -> ``("checks", "tool_called", 0, "name")``."""
    out: list[str | int] = []
    for name, index in re.findall(r"\.([^.\[\]]+)|\[(\d+)\]", where):
        out.append(int(index) if index else name)
    return tuple(out)


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    return value if isinstance(value, str) else ""


def _id_from(value: Any) -> str | None:
    return value if isinstance(value, str) and re.match(ID_PATTERN, value) else None


def slug(label: str) -> str:
    """``"Billing dispute (EN)"`` -> ``billing-dispute-en``; "" when nothing ASCII is left."""
    s = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:64].rstrip("-")
    return s if re.match(ID_PATTERN, s or "-") else ""
