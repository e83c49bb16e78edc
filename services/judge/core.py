"""One conversation's :class:`Judgment` from its scenario, its transcript and how it ended.

A conversation the platform failed (the agents never joined, one crashed or left, it timed
out: ``outcome: failed`` in batch.json after its retries) is an infrastructure failure: it gets
no verdict and never counts in a pass rate. Every other conversation gets a verdict from its
criteria: ``fail`` if any failed, else ``inconclusive`` if any was, else ``pass`` (no criterion
at all: ``inconclusive``). ``score`` is livekit-agents' (pass 1, inconclusive 0.5, fail 0, averaged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from .checks import AGENT, Criterion, Turn, Verdict

JUDGMENT_VERSION = 1


class Judgment(msgspec.Struct, frozen=True, kw_only=True):
    """``batches/<batch_id>/judgments/<conversation_id>.json`` (a public file format: add fields, never rename)."""

    version: int = JUDGMENT_VERSION
    batch_id: str
    conversation_id: str
    scenario_id: str
    label: str
    trial: int
    attempts: int
    status: Literal["judged", "infra_failure"]
    verdict: Verdict | None
    score: float | None
    infra_failure: str | None = None
    ended: str | None = None
    turns: int = 0
    first_token_s: list[float] = []  # the agent's (support) turns, in order
    criteria: list[Criterion] = []
    judge_model: str | None = None  # None: no LLM judge ran
    judge_error: str | None = None
    judged_at: float


def verdict_of(criteria: Sequence[Criterion]) -> tuple[Verdict, float | None]:
    if not criteria:
        return "inconclusive", None
    verdicts = [c.verdict for c in criteria]
    score = sum(1.0 if v == "pass" else 0.5 if v == "inconclusive" else 0.0 for v in verdicts) / len(verdicts)
    if "fail" in verdicts:
        return "fail", score
    if "inconclusive" in verdicts:
        return "inconclusive", score
    return "pass", score


def judgment(*, batch_id: str, conversation_id: str, scenario_id: str, label: str, trial: int,
             entry: dict[str, Any], turns: Sequence[Turn], criteria: Sequence[Criterion],
             judge_model: str | None, judge_error: str | None, now: float) -> Judgment:
    """``entry``: the conversation's entry in batch.json (outcome, reason, attempts, ended)."""
    common: dict[str, Any] = dict(batch_id=batch_id, conversation_id=conversation_id, scenario_id=scenario_id, label=label,
                  trial=trial, attempts=int(entry.get("attempts") or 0), ended=entry.get("ended"),
                  turns=len(turns), judged_at=now,
                  first_token_s=[t.first_token_s for t in turns if t.role == AGENT and t.first_token_s is not None])
    outcome = entry.get("outcome")
    if outcome != "completed":
        reason = entry.get("reason") or ("never settled" if outcome is None else "failed")
        return Judgment(**common, status="infra_failure", verdict=None, score=None, infra_failure=str(reason))
    verdict, score = verdict_of(criteria)
    return Judgment(**common, status="judged", verdict=verdict, score=score, criteria=list(criteria),
                    judge_model=judge_model, judge_error=judge_error)
