"""The simulated caller's system prompt, from LiveKit's scenario fields: one builder for every model.

LiveKit's ``scenarios.yaml`` describes the caller in prose (``instructions``: who they are, what
they know, what they want) and hands ``userdata`` to the agent under test. The prompt is the
instructions as written, the goal when crosstalk's extension names one, and the ``userdata`` facts
the instructions point at: a ``{key}`` or ``{userdata.key}`` placeholder is filled in, and a top-level
key the instructions name (``account_id``, or ``account id``) is listed as a fact the caller knows.
Other userdata stays the agent's alone, as it is under ``lk agent simulate``.

Then the rules of a phone call, kept short for small local models: one or two spoken sentences a
turn, the facts exactly as written, never the agent's side, and a goodbye with the ``end_conversation``
tool once the goal is met or the agent cannot help. The local model ends the call when the caller
takes leave (services/llm/core.py); an OpenAI model calls the tool.
"""

from __future__ import annotations

import re
from typing import Any

from shared.scenarios import END_TOOL, Persona

_PLACEHOLDER = re.compile(r"\{(?:userdata\.)?([A-Za-z_][\w.]*)\}")

RULES = (
    "This is a phone call and you are the caller, never the agent. "
    "Say one or two short spoken sentences per turn, in plain words: no lists, no role labels, no stage directions. "
    "When the agent asks for a detail, give it exactly as written above; never invent other names, numbers or dates. "
    "Stay on your goal and answer what the agent just said."
)


def _lookup(userdata: dict[str, Any], dotted: str) -> Any:
    value: Any = userdata
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _fact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')}: {_fact(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fact(v) for v in value)
    return str(value)


def fill(instructions: str, userdata: dict[str, Any]) -> str:
    """``instructions`` with each ``{key}`` / ``{userdata.key}`` naming a userdata value replaced by it."""
    def sub(m: re.Match[str]) -> str:
        value = _lookup(userdata, m.group(1))
        return m.group(0) if value is None else _fact(value)
    return _PLACEHOLDER.sub(sub, instructions)


def named_facts(instructions: str, userdata: dict[str, Any]) -> list[str]:
    """``key: value`` for each top-level userdata key the instructions mention by name."""
    low = instructions.lower()
    return [f"{key.replace('_', ' ')}: {_fact(value)}" for key, value in userdata.items()
            if key.lower() in low or key.replace("_", " ").lower() in low]


def build(caller: Persona, agent_name: str, userdata: dict[str, Any], language: str) -> str:
    """The caller's system prompt (see the module docstring)."""
    instructions = fill(caller.persona.strip(), userdata)
    parts = [instructions]
    if caller.goal:
        parts.append(f"Your goal: {caller.goal.strip()}")
    if facts := named_facts(caller.persona, userdata):
        parts.append("Details you know: " + "; ".join(facts) + ".")
    parts.append(f"You are calling and talking with {agent_name}. {RULES}")
    if language.split("-")[0] != "en":
        parts.append(f"Speak language '{language}'.")
    parts.append(f"Once your goal is met, or the agent cannot help, say goodbye and call the {END_TOOL} tool.")
    return "\n".join(parts)
