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

Unknown keys of LiveKit's part are kept (in ``Scenario.doc``): LiveKit files may carry fields
crosstalk does not know. An unknown key *close to* one of LiveKit's (``agent_expectation:``) is
an error naming the closest known key, since the misspelt key would silently drop what it holds
(there, the judge's criteria). Inside ``crosstalk:`` every unknown key is an error, with the
closest known key when there is one. Every error names its line (files) or field path (inline
lists), and all errors are reported at once: each key of each mapping is checked against its
struct's fields before anything is converted (msgspec stops at the first unknown field).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable
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
# LiveKit's schema (livekit-cli ``scenariosFile``), plus the per-scenario ``id`` crosstalk reads
LIVEKIT_FILE_KEYS = ("name", "id", "scenarios")
LIVEKIT_ENTRY_KEYS = ("label", "instructions", "agent_expectations", "tags", "userdata", "id", EXTENSION)
# difflib ratio above which an unknown key is taken for a typo: "agent_expectation" (0.97), "tag"
# (0.86) and "Label" (0.8) are; "some_future_field" or "metadata" (< 0.5) are somebody's own field
CLOSE_KEY_CUTOFF = 0.75

LineOf = Callable[[FieldPath], "int | None"]


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
    _livekit_keys(doc, LIVEKIT_FILE_KEYS, (), problems, lambda p: line_of(marked.lines, p))
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


def _entries(entries: list[Any], base: FieldPath, problems: list[Problem], line: LineOf) -> list[Scenario]:
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


def _entry(entry: Any, path: FieldPath, problems: list[Problem], line: LineOf) -> Scenario | None:
    def bad(sub: FieldPath, reason: str) -> None:
        problems.append(Problem(line((*path, *sub)), field_name((*path, *sub)), reason))

    if not isinstance(entry, dict):
        bad((), "must be a mapping (label, instructions, agent_expectations, tags, userdata)")
        return None
    before = len(problems)
    _livekit_keys(entry, LIVEKIT_ENTRY_KEYS, path, problems, line)
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


def _extension(raw: Any, path: FieldPath, problems: list[Problem], line: LineOf) -> Extension | None:
    if raw is None:
        return Extension()
    before = len(problems)
    _check(raw, Extension, path, problems, line)
    if len(problems) > before:
        return None
    try:
        return msgspec.convert(raw, Extension)
    except msgspec.ValidationError as exc:  # _check missed it: still name the field
        reason, _, where = str(exc).partition(" - at `$")
        sub = (*path, *_msgspec_path(where.rstrip("`")))
        problems.append(Problem(line(sub), field_name(sub), reason))
        return None


# --------------------------------------------------------------------------- unknown keys, every error


def closest_key(name: str, known: Iterable[str]) -> str | None:
    """The known key ``name`` is probably a typo of, if any."""
    near = difflib.get_close_matches(name, list(known), n=1, cutoff=CLOSE_KEY_CUTOFF)
    return near[0] if near else None


def _unknown_key(key: str, known: tuple[str, ...], *, listed: bool) -> str:
    near = closest_key(key, known)
    return "unknown key" + (f"; did you mean {near}?" if near else "") + (f" (known: {', '.join(known)})" if listed else "")


def _livekit_keys(mapping: dict[Any, Any], known: tuple[str, ...], path: FieldPath, problems: list[Problem],
                  line: LineOf) -> None:
    """LiveKit's open schema: an unknown key is kept unless it looks like a misspelt known one."""
    for key in map(str, mapping):
        if key not in known and closest_key(key, known) is not None:
            problems.append(Problem(line((*path, key)), field_name((*path, key)),
                                    _unknown_key(key, known, listed=False)))


def _check(value: Any, tp: Any, path: FieldPath, problems: list[Problem], line: LineOf) -> None:
    """Every problem of ``value`` read as ``tp``: each unknown key of each mapping, each bad value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and isinstance(value, dict):
        fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
        for key, sub in value.items():
            if (field := fields.get(str(key))) is None:
                problems.append(Problem(line((*path, str(key))), field_name((*path, str(key))),
                                        _unknown_key(str(key), tuple(fields), listed=True)))
            else:
                _check(sub, field.type, (*path, str(key)), problems, line)
        for name, field in fields.items():
            if field.required and name not in value:
                problems.append(Problem(line((*path, name)), field_name((*path, name)), "is required"))
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, args[0], (*path, i), problems, line)
    elif origin is dict and isinstance(value, dict):
        for key, sub in value.items():
            _check(key, args[0], (*path, str(key)), problems, line)
            _check(sub, args[1], (*path, str(key)), problems, line)
    elif origin in (typing.Union, types.UnionType) and isinstance(value, dict) and (struct := _struct_of(args)):
        _check(value, struct, path, problems, line)
    else:
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as exc:
            reason, _, where = str(exc).partition(" - at `$")
            sub = (*path, *_msgspec_path(where.rstrip("`")))
            problems.append(Problem(line(sub), field_name(sub), reason))


def _struct_of(union: tuple[Any, ...]) -> type[msgspec.Struct] | None:
    """The one Struct of ``X | None`` (a mapping can only be meant as it)."""
    structs = [a for a in union if isinstance(a, type) and issubclass(a, msgspec.Struct)]
    return structs[0] if len(structs) == 1 else None


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
