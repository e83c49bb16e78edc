"""Replies to a prompt without crosstalk's marker line: the user's own agent under test.

crosstalk's agents carry ``[crosstalk scenario=... role=...]`` in their instructions
(:mod:`.core`); a user's agent (``batch.start`` ``target_agent``, examples/target_agent) has
its own instructions and knows nothing of it. Offline, such an agent points its
OpenAI-compatible client at this server, and gets a deterministic reply from the scenario
scripts themselves: the script line equal to the last user message (crosstalk's customer
spoke it; compared with surrounding whitespace trimmed) is found, scenarios in id order, and
the reply is the next ``support`` line of that script. A last user message that matches no
script line (a customer's closing line, a human typing) gets :data:`UNMATCHED_REPLY`.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.scenarios import Scenario

UNMATCHED_REPLY = "Thank you for contacting us. Is there anything else I can help you with?"


def last_user_text(messages: Iterable[object]) -> str | None:
    text = None
    for m in messages:
        if getattr(m, "role", None) == "user":
            text = m.text()  # type: ignore[attr-defined]
    return text


def next_support_line(user_text: str, scenarios: Iterable[Scenario]) -> tuple[str, bool] | None:
    """``(text, end)`` of the support line after the script line equal to ``user_text``; None if none."""
    wanted = user_text.strip()
    for sc in sorted(scenarios, key=lambda s: s.id):
        for i, line in enumerate(sc.script):
            if line.text.strip() != wanted:
                continue
            for after in sc.script[i + 1:]:
                if after.role == "support":
                    return after.text, after.end
    return None


def plan(messages: Iterable[object], offers_end: bool, scenarios: Iterable[Scenario]) -> tuple[str, bool, str]:
    """``(text, end_call, role label)`` for a prompt without a marker."""
    user = last_user_text(messages)
    found = next_support_line(user, scenarios) if user else None
    if found is None:
        return UNMATCHED_REPLY, False, "none"
    text, end = found
    return text, end and offers_end, "support"


__all__ = ["UNMATCHED_REPLY", "next_support_line", "plan"]
