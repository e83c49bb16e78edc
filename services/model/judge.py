"""The scripted model as a deterministic stand-in for an LLM judge (tests and offline runs).

livekit-agents' judges (``livekit.agents.evals``) ask for a verdict by offering one tool,
``submit_verdict(verdict, reasoning)``, with ``tool_choice="required"``; the user message
holds ``Criteria: ...`` and ``Conversation:`` (one ``role: text`` line per message). This
stand-in does no language understanding. Its rule, fixed and documented so tests can rely on
it: every phrase in double quotes in the criterion ("unlocked", “refund”) must appear
(case-insensitive) in an ``assistant:`` line of the conversation -> ``pass`` citing that
line; one missing -> ``fail`` naming it; a criterion without quoted phrases -> ``maybe``.
"""

from __future__ import annotations

import json
import re

VERDICT_TOOL = "submit_verdict"
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")


def verdict(prompt: str) -> dict[str, str]:
    """``{"verdict": ..., "reasoning": ...}`` for a judge prompt, by the rule above."""
    criteria, _, rest = prompt.partition("\nConversation:\n")
    criteria = criteria.removeprefix("Criteria:").strip()
    conversation = rest.split("\n\nEvaluate if", 1)[0]
    agent_lines = [line.split(":", 1)[1].strip() for line in conversation.splitlines()
                   if line.startswith("assistant:")]
    phrases = [a or b for a, b in _QUOTED.findall(criteria)]
    if not phrases:
        return {"verdict": "maybe", "reasoning": "no quoted phrase in the criterion for the stand-in judge to check"}
    cited: list[str] = []
    for phrase in phrases:
        hit = next((line for line in agent_lines if phrase.lower() in line.lower()), None)
        if hit is None:
            return {"verdict": "fail", "reasoning": f"the agent never said \"{phrase}\""}
        cited.append(f"\"{phrase}\" in: {hit}")
    return {"verdict": "pass", "reasoning": "; ".join(cited)}


def arguments(prompt: str) -> str:
    return json.dumps(verdict(prompt), ensure_ascii=False)
