"""The judge's pure parts: deterministic checks, verdict assembly, the scripted judge's rule, the regression gate."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from cli.compare import Thresholds, compare
from services.judge import checks
from services.judge.checks import Turn
from services.judge.core import judgment, verdict_of
from services.judge.llm import expectations
from services.model import judge as scripted_judge
from shared import scenario_files

SCENARIO = scenario_files.from_entries([{
    "label": "t", "instructions": "caller", "agent_expectations": "- Says \"unlocked\"\n- Polite",
    "crosstalk": {"id": "t", "language": "hi", "checks": {
        "must_mention": ["अनलॉक"], "must_not_say": ["पिन बताइए"], "ended_by": "support", "within_turns": 4,
        "language": True, "tool_called": [{"name": "end_conversation", "by": "support"}],
        "latency": {"first_token_s_max": 1.0, "first_token_s_p95": 0.5, "total_s_max": 2.0,
                    "max": {"e2e_latency_s": 1.5}}}},
}])[0]


def turns(*texts: str, first: float | None = 0.2) -> list[Turn]:
    return [Turn(turn=i, role="customer" if i % 2 == 0 else "support", text=t, first_token_s=first)
            for i, t in enumerate(texts)]


def by_name(cs: list[checks.Criterion]) -> dict[str, str]:
    return {c.name: c.verdict for c in cs}


def test_all_checks_pass_on_a_good_hindi_conversation() -> None:
    got = checks.run(SCENARIO, turns("नमस्ते, खाता लॉक है", "खाता अनलॉक कर दिया है"), "end_conversation: support")
    assert set(by_name(got).values()) == {"pass", "inconclusive"}
    assert by_name(got)["latency: total_s max <= 2.0"] == "inconclusive"  # no turn recorded total_s
    assert by_name(got)["latency: e2e_latency_s max <= 1.5"] == "inconclusive"  # text mode: no voice timings
    assert "turn 1 (support): खाता अनलॉक कर दिया है" in next(c.evidence for c in got if c.name.startswith("must_m"))


def test_each_check_fails_with_its_evidence() -> None:
    bad = [msgspec.structs.replace(t, timings={"e2e_latency_s": 2.5})
           for t in turns("hello, locked out", "कृपया पिन बताइए", "ok", "done", "bye", first=0.9)]
    got = by_name(checks.run(SCENARIO, bad, "max_turns"))
    for name in ("must_mention: अनलॉक", "must_not_say: पिन बताइए", "ended_by: support", "within_turns: 4",
                 "language: hi", "tool_called: end_conversation by support", "latency: first_token_s p95 <= 0.5",
                 "latency: e2e_latency_s max <= 1.5"):
        assert got[name] == "fail", name
    assert got["latency: first_token_s max <= 1.0"] == "pass"


@pytest.mark.parametrize(("text", "lang", "fits"), [
    ("नमस्ते जी, 4417 नंबर", "hi", True), ("Hello there", "hi", False), ("Haan ji, refund ho gaya", "hi-Latn", True),
    ("ठीक है", "hi-Latn", False), ("Thank you!", "en", True), ("Bonjour", "ja", None),
])
def test_language_is_checked_by_script(text: str, lang: str, fits: bool | None) -> None:
    assert checks.language_fits(text, lang) is fits


def test_verdicts_infra_failures_and_score() -> None:
    c = checks.Criterion
    assert verdict_of([]) == ("inconclusive", None)
    assert verdict_of([c(name="a", kind="check", verdict="pass", evidence=""),
                       c(name="b", kind="llm", verdict="inconclusive", evidence="")]) == ("inconclusive", 0.75)
    assert verdict_of([c(name="a", kind="check", verdict="fail", evidence="")])[0] == "fail"
    j = judgment(batch_id="b", conversation_id="b-00000", scenario_id="t", label="t", trial=1,
                 entry={"outcome": "failed", "reason": "join_timeout", "attempts": 3}, turns=[], criteria=[],
                 judge_model=None, judge_error=None, now=0.0)
    assert (j.status, j.verdict, j.infra_failure, j.attempts) == ("infra_failure", None, "join_timeout", 3)


def test_expectations_split_into_criteria() -> None:
    assert expectations("- a\n* b\n1. c\n") == ["a", "b", "c"]
    assert expectations("Just be nice.") == ["Just be nice."] and expectations("  ") == []


def test_the_scripted_judges_rule() -> None:
    prompt = ('Criteria: Says "unlocked" and “verified”\n\nConversation:\nuser: help\nassistant: You are verified.\n'
              'assistant: Account unlocked.\n\nEvaluate if the conversation meets the criteria.')
    assert scripted_judge.verdict(prompt) == {
        "verdict": "pass", "reasoning": '"unlocked" in: Account unlocked.; "verified" in: You are verified.'}
    assert scripted_judge.verdict(prompt.replace("unlocked.", "fine."))["verdict"] == "fail"
    assert scripted_judge.verdict(prompt.replace('"unlocked" and “verified”', "polite"))["verdict"] == "maybe"


def report(rate: float, k: float, p95: float, failing: dict[str, int]) -> dict[str, object]:
    return {"scenarios": [{"scenario_id": "s", "pass_rate": rate, "pass_k": k, "latency_p95_s": p95,
                           "failing_criteria": failing, "n": 10, "k": 2}],
            "totals": {"conversations": 10, "judged": 10, "infra_failures": 0, "not_judged": 0}}


def test_compare_flags_regressions_past_thresholds_only() -> None:
    base = report(0.9, 0.7, 0.40, {"a": 1})
    ok = compare(base, report(0.85, 0.65, 0.45, {"a": 1}), Thresholds())
    assert ok.violations == [] and {r.change for r in ok.rows} == {"worse"}
    bad = compare(base, report(0.5, 0.2, 1.0, {"b": 3}), Thresholds(max_latency_p95_increase_s=0.5))
    assert [v.split(":")[1].split()[0] for v in bad.violations] == ["pass_rate", "pass_k", "latency_p95_s"]
    assert bad.newly_failing == {"s": ["b"]} and bad.no_longer_failing == {"s": ["a"]}
    assert compare(base, {**report(1, 1, 0, {}), "scenarios": []}, Thresholds()).violations == [
        "s: in the baseline, missing from the candidate"]
    better = compare(base, report(1.0, 1.0, 0.3, {}), Thresholds())
    assert better.violations == [] and {r.change for r in better.rows} == {"better"}


@pytest.mark.parametrize("sid", sorted(__import__("shared.scenarios", fromlist=["library"]).library()))
def test_each_built_in_script_passes_its_own_checks_and_expectations(sid: str) -> None:
    from shared.scenarios import get

    sc = get(sid)
    played = [Turn(turn=i, role=line.role, text=line.text) for i, line in enumerate(sc.script)]
    got = checks.run(sc, played, "end_conversation: support")
    assert got and all(c.verdict == "pass" for c in got), [(c.name, c.evidence) for c in got if c.verdict != "pass"]
    conv = "\n".join(("assistant: " if t.role == "support" else "user: ") + t.text for t in played)
    for criterion in expectations(sc.agent_expectations):
        prompt = f"Criteria: {criterion}\n\nConversation:\n{conv}\n\nEvaluate if the conversation meets the criteria."
        assert scripted_judge.verdict(prompt)["verdict"] == "pass", criterion


def test_thresholds_from_a_file_then_the_command_line(tmp_path: Path) -> None:
    from cli.compare import load_thresholds

    f = tmp_path / "gate.yaml"
    f.write_text("max_pass_rate_drop: 0.05\nmax_latency_p95_increase_s: 0.2\n")
    th = load_thresholds(f, {"max_pass_rate_drop": 0.2, "max_pass_k_drop": None})
    assert (th.max_pass_rate_drop, th.max_pass_k_drop, th.max_latency_p95_increase_s) == (0.2, 0.10, 0.2)
    f.write_text("max_pass_rate_dorp: 0.05\n")
    with pytest.raises(ValueError, match="max_pass_rate_dorp"):
        load_thresholds(f, {})


def test_batch_files_read_turns_with_timings_skip_a_torn_line_and_validate_ids(tmp_path: Path) -> None:
    from services.judge.store import BatchFiles
    from shared.contracts import ContractError

    files = BatchFiles(tmp_path, "b-1")
    path = files.transcript("b-1-00000")
    path.parent.mkdir(parents=True)
    line = {"conversation_id": "b-1-00000", "turn": 0, "role": "support", "text": "नमस्ते", "started_at": 1.0,
            "ended_at": 2.0, "attempt": 1, "batch_id": "b-1", "first_token_s": 0.3, "e2e_latency_s": 0.9}
    path.write_text(json.dumps(line, ensure_ascii=False) + '\n{"conversation_id": "b-1-00000", "tu', encoding="utf-8")
    (turn,) = files.turns("b-1-00000")
    assert turn.text == "नमस्ते" and turn.timing("first_token_s") == 0.3 and turn.timings == {"e2e_latency_s": 0.9}
    for bad in ("../x", "a/b", ""):
        with pytest.raises(ContractError):
            files.judgment_path(bad)
    with pytest.raises(ContractError):
        BatchFiles(tmp_path, "../etc")
