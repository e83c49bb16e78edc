"""One conversation's :class:`Judgment` from its scenario, its transcript and how it ended.

Whose fault decides the bucket (docs/ARCHITECTURE.md "Verdicts"). crosstalk measures the agent
under test, so what *the agent* did wrong is a failed test: a conversation that ended
``target_no_show``, ``target_silent``, ``target_unresponsive`` or ``target_left`` is judged
``fail`` with that outcome as its failing criterion, and counts in n and in pass^k. Only
crosstalk's own faults (its worker, the stack, a lost recording, the judge model) are
``infra_failure``: no verdict, counted apart, never dropped, gateable (``--max-infra-rate``).

A completed conversation's verdict comes from its criteria: ``fail`` if any failed; else
``infra_failure`` if the judge model failed (``judge_error``: retried once at batch end and by
``crosstalk judge --retry``); else ``inconclusive`` if any criterion was inconclusive or
``not_judged`` (an expectation with no judge configured: never a pass); else ``pass`` (no
criterion at all: ``inconclusive``). ``score`` is livekit-agents' (pass 1, inconclusive 0.5,
fail 0, averaged over the judged criteria).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from shared.metrics import reason_label

from .checks import AGENT, Criterion, Turn, Verdict

JUDGMENT_VERSION = 2
# The agent under test's own failures (worker/simulator/customer.py ends them; the dispatcher never retries them).
AGENT_FAULTS = frozenset({"target_no_show", "target_silent", "target_unresponsive", "target_left"})
WHAT_IT_MEANS = {
    "target_no_show": "the agent never joined the call, or never got ready to listen",
    "target_silent": "the agent joined but never answered",
    "target_unresponsive": "the agent stopped answering mid-conversation",
    "target_left": "the agent left the call before answering, or while the caller waited for an answer",
}


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
    outcome: str | None = None  # how the conversation ended: completed, or the failure's label
    ended: str | None = None
    turns: int = 0
    first_token_s: list[float] = []  # the agent's (support) turns, in order
    criteria: list[Criterion] = []
    not_judged: int = 0  # criteria no judge decided (no judge configured)
    judge_model: str | None = None  # None: no LLM judge ran
    judge_error: str | None = None
    judged_at: float


def verdict_of(criteria: Sequence[Criterion]) -> tuple[Verdict, float | None]:
    if not criteria:
        return "inconclusive", None
    verdicts = [c.verdict for c in criteria]
    judged = [v for v in verdicts if v != "not_judged"]
    score = (sum(1.0 if v == "pass" else 0.5 if v == "inconclusive" else 0.0 for v in judged) / len(judged)
             if judged else None)
    if "fail" in verdicts:
        return "fail", score
    if "inconclusive" in verdicts or "not_judged" in verdicts:
        return "inconclusive", score
    return "pass", score


def agent_fault(entry: dict[str, Any]) -> Criterion | None:
    """The failing criterion of a conversation the agent under test failed; None if it did not."""
    if entry.get("outcome") != "failed":
        return None
    reason = str(entry.get("reason") or "")
    label = reason_label(reason)
    if label not in AGENT_FAULTS:
        return None
    return Criterion(name=label, kind="outcome", verdict="fail", evidence=f"{WHAT_IT_MEANS[label]}: {reason}")


def judgment(*, batch_id: str, conversation_id: str, scenario_id: str, label: str, trial: int,
             entry: dict[str, Any], turns: Sequence[Turn], criteria: Sequence[Criterion],
             judge_model: str | None, judge_error: str | None, now: float) -> Judgment:
    """``entry``: the conversation's entry in batch.json (outcome, reason, attempts, ended)."""
    outcome = entry.get("outcome")
    common: dict[str, Any] = dict(
        batch_id=batch_id, conversation_id=conversation_id, scenario_id=scenario_id, label=label, trial=trial,
        attempts=int(entry.get("attempts") or 0), ended=entry.get("ended"), turns=len(turns), judged_at=now,
        outcome=outcome if outcome != "failed" else reason_label(str(entry.get("reason") or "")),
        first_token_s=[t.first_token_s for t in turns if t.role == AGENT and t.first_token_s is not None])
    fault = agent_fault(entry)
    if fault is not None:
        return Judgment(**common, status="judged", verdict="fail", score=0.0, criteria=[fault])
    if outcome != "completed":
        reason = entry.get("reason") or ("never settled" if outcome is None else "failed")
        return Judgment(**common, status="infra_failure", verdict=None, score=None, infra_failure=str(reason))
    verdict, score = verdict_of(criteria)
    not_judged = sum(c.verdict == "not_judged" for c in criteria)
    if judge_error is not None and verdict != "fail":  # the judge model is crosstalk's: not the agent's result
        return Judgment(**common, status="infra_failure", verdict=None, score=None,
                        infra_failure=f"judge_error: {judge_error}", criteria=list(criteria), not_judged=not_judged,
                        judge_model=judge_model, judge_error=judge_error)
    return Judgment(**common, status="judged", verdict=verdict, score=score, criteria=list(criteria),
                    not_judged=not_judged, judge_model=judge_model, judge_error=judge_error)
