"""Verdict semantics a CI user relies on: the agent's failures are failed tests, crosstalk's are infra,
nothing unjudged passes, and the compare gate cannot be passed by missing data (the truth table)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from cli import report
from cli.compare import Thresholds, compare
from services.judge import checks
from services.judge.batch import JudgeConfig, judge_to_the_end
from services.judge.core import judgment
from services.judge.store import BatchFiles
from shared import batch_plan, scenarios
from shared.contracts import BatchSpec


def judged(entry: dict[str, Any], criteria: list[checks.Criterion] | None = None, error: str | None = None):  # noqa: ANN201
    return judgment(batch_id="b", conversation_id="b-00000", scenario_id="s", label="s", trial=1, entry=entry,
                    turns=[], criteria=criteria or [], judge_model="m" if error else None, judge_error=error, now=0.0)


@pytest.mark.parametrize("reason", ["target_no_show: agent 'x' did not join within 20 s",
                                    "target_silent: agent 'x' joined but did not answer within 8 s",
                                    "target_unresponsive: agent 'x' answered 2 turn(s), then did not answer",
                                    "target_left: agent 'x' left the room after 1 turn(s)"])
def test_the_agents_own_failures_are_failed_tests(reason: str) -> None:
    j = judged({"outcome": "failed", "reason": reason, "attempts": 1})
    label = reason.split(":")[0]
    assert (j.status, j.verdict, j.score, j.outcome) == ("judged", "fail", 0.0, label)
    assert [(c.name, c.kind, c.verdict) for c in j.criteria] == [(label, "outcome", "fail")]
    assert reason in j.criteria[0].evidence


@pytest.mark.parametrize("reason", ["join_timeout: both agents never joined", "agent_error: worker crashed",
                                    "recording_missing: customer channel", "conversation_timeout: 600 s"])
def test_crosstalks_own_faults_are_infra(reason: str) -> None:
    j = judged({"outcome": "failed", "reason": reason, "attempts": 3})
    assert (j.status, j.verdict, j.infra_failure) == ("infra_failure", None, reason)


def test_not_judged_is_inconclusive_and_a_judge_error_is_infra_unless_a_check_failed() -> None:
    c = checks.Criterion
    ok = c(name="must_mention: x", kind="check", verdict="pass", evidence="")
    nj = c(name="expectation 1: polite", kind="llm", verdict="not_judged", evidence="no judge configured")
    j = judged({"outcome": "completed"}, [ok, nj])
    assert (j.status, j.verdict, j.not_judged, j.score) == ("judged", "inconclusive", 1, 1.0)
    err = c(name="agent_expectations", kind="llm", verdict="inconclusive", evidence="judge failed")
    j = judged({"outcome": "completed"}, [ok, err], error="APIConnectionError: down")
    assert (j.status, j.verdict, j.infra_failure) == ("infra_failure", None, "judge_error: APIConnectionError: down")
    bad = c(name="must_mention: y", kind="check", verdict="fail", evidence="")
    assert judged({"outcome": "completed"}, [bad, err], error="down").verdict == "fail"  # decided without the judge


def test_the_judge_follows_openai_settings_like_the_agents() -> None:
    assert JudgeConfig.from_env({}).url is None
    assert JudgeConfig.from_env({"OPENAI_BASE_URL": "http://llm:8000/v1"}).url == "http://llm:8000/v1"
    assert JudgeConfig.from_env({"OPENAI_API_KEY": "sk-x"}).url == "https://api.openai.com/v1"
    cfg = JudgeConfig.from_env({"CROSSTALK_JUDGE_URL": "http://j/v1", "OPENAI_BASE_URL": "http://llm/v1",
                                "OPENAI_API_KEY": "sk-secret"})
    assert cfg.url == "http://j/v1" and "sk-secret" not in repr(cfg)


# --------------------------------------------------------------------------- the gate's truth table

def row(sid: str = "s", *, rate: float | None = 0.9, k: float | None = 0.8, p95: float | None = 0.4,
        n: int = 4, trials: int = 2) -> dict[str, Any]:
    return {"scenario_id": sid, "pass_rate": rate, "pass_k": k, "latency_p95_s": p95, "n": n, "k": trials,
            "failing_criteria": {}}


def rep(*rows: dict[str, Any], judged: int = 4, infra: int = 0, not_judged: int = 0) -> dict[str, Any]:
    return {"scenarios": list(rows), "totals": {"conversations": judged + infra, "judged": judged,
                                                 "infra_failures": infra, "not_judged": not_judged,
                                                 "infra_reasons": {"join_timeout": infra} if infra else {}}}


BASE = rep(row())
CASES = {
    "identical candidate": (BASE, rep(row()), Thresholds(), True),
    "candidate lacks a figure the baseline has": (BASE, rep(row(p95=None)), Thresholds(), False),
    "n < k: pass^k missing": (BASE, rep(row(k=None, n=1)), Thresholds(), False),
    "not judged": (BASE, rep(row(), not_judged=1), Thresholds(), False),
    "not judged, allowed": (BASE, rep(row(), not_judged=1), Thresholds(allow_not_judged=True), True),
    "infra-only candidate": (BASE, rep(row(rate=None, k=None, p95=None, n=0), judged=0, infra=4), Thresholds(),
                             False),
    "infra-only, infra not gated": (BASE, rep(row(rate=None, k=None, p95=None, n=0), judged=0, infra=4),
                                    Thresholds(max_infra_rate=None), False),
    "infra above the rate": (BASE, rep(row(), judged=4, infra=1), Thresholds(max_infra_rate=0.1), False),
    "infra within the rate": (BASE, rep(row(), judged=9, infra=1), Thresholds(max_infra_rate=0.1), True),
    "scenario missing": (BASE, rep(row("other")), Thresholds(), False),
    "no baseline, floors met": (None, rep(row()), Thresholds(min_pass_rate=0.8, min_pass_k=0.5), True),
    "no baseline, pass rate below the floor": (None, rep(row(rate=0.5)), Thresholds(min_pass_rate=0.8), False),
    "no baseline, n < k against min_pass_k": (None, rep(row(k=None, n=1)), Thresholds(min_pass_k=0.5), False),
    "no baseline, silent agent": (None, rep(row(rate=0.0, k=0.0)), Thresholds(min_pass_rate=0.5), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compare_truth_table(name: str) -> None:
    base, cand, th, passes = CASES[name]
    result = compare(base, cand, th)
    assert result.passed is passes, result.violations


def test_missing_data_says_why() -> None:
    v = compare(BASE, rep(row(k=None, n=1)), Thresholds()).violations
    assert v == ["s: pass_k 0.800 in the baseline, missing in the candidate (pass^k: n < k (1 judged trial(s), k = 2))"]
    v = compare(None, rep(row(), not_judged=2), Thresholds()).violations
    assert len(v) == 1 and "2 conversation(s) have expectations no judge decided" in v[0]


# --------------------------------------------------------------------------- a silent agent, end to end on files

def test_a_silent_agent_is_a_failed_junit_case_with_pass_rate_0(tmp_path: Path) -> None:
    sc = scenarios.library()["en-billing-dispute"]
    files = BatchFiles(tmp_path, "b-silent")
    files.write_plan(BatchSpec(batch_id="b-silent", conversations=2, concurrency=1, scenario=sc.id, language="en",
                               max_turns=8, mode="text", scenarios=batch_plan.batch_scenarios([sc]), trials=2,
                               target_agent="acme"))
    reason = "target_silent: agent 'acme' joined but did not answer within 8 s (CROSSTALK_TARGET_REPLY_S)"
    files.batch_json.write_text(json.dumps({"batch_id": "b-silent", "status": "completed", "conversations": {
        f"b-silent-{i:05d}": {"outcome": "failed", "reason": reason, "attempts": 1} for i in range(2)}}))
    _, event = asyncio.run(judge_to_the_end(files, scenarios.library(), None))
    assert event is not None and event.verdicts == {"pass": 0, "fail": 2, "inconclusive": 0, "infra_failure": 0}
    assert files.judged() == event
    data = report.build(files)
    assert (data["totals"]["pass_rate"], data["totals"]["failed"], data["totals"]["infra_failures"]) == (0.0, 2, 0)
    assert data["scenarios"][0]["pass_k"] == 0.0
    junit = report.junit_xml(data).decode()
    assert junit.count("<failure") == 2 and "target_silent" in junit and "<skipped" not in junit
    assert not compare(None, data, Thresholds(min_pass_rate=0.5)).passed


def test_within_turns_counts_the_exchange_not_a_greeting() -> None:
    sc = scenarios.library()["en-account-help"]
    sc = type(sc)(**{**{f: getattr(sc, f) for f in sc.__struct_fields__},
                     "checks": type(sc.checks)(within_turns=2)})
    greeting = checks.Turn(turn=0, role="support", text="Hi, Acme here.", unprompted=True)
    asked = [checks.Turn(turn=1, role="customer", text="Locked out."), checks.Turn(turn=2, role="support", text="Ok.")]
    got = {c.name: (c.verdict, c.evidence) for c in checks.run(sc, [greeting, *asked], None)}
    assert got["within_turns: 2"] == ("pass", "2 turn(s) (+1 unprompted)")
