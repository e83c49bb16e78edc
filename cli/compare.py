"""``crosstalk compare``: what got better or worse between two reports, and whether it passes the gate.

Pure: an optional baseline report, a candidate report (cli/report.py's JSON) and
:class:`Thresholds` in, a :class:`Comparison` out. A gate must never be passed by missing data:

* per scenario it compares pass rate, pass^k and the agent's latency p95; a figure the baseline
  has and the candidate lacks (no judged trial, or pass^k with fewer trials than k: ``n < k``)
  is a regression, as is a baseline scenario missing from the candidate;
* absolute gates hold with or without a baseline: ``min_pass_rate`` and ``min_pass_k`` per
  scenario (a missing figure fails them), ``max_infra_rate`` on crosstalk's own faults;
* a candidate with no judged conversation fails; so does one with ``not_judged`` criteria
  (no judge configured) unless ``allow_not_judged``.
It lists the criteria that newly fail or no longer fail (the judges' reasons).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

Direction = Literal["higher", "lower"]
Change = Literal["better", "worse", "same", "missing", "n/a"]
METRICS: dict[str, tuple[str, Direction]] = {
    "pass_rate": ("max_pass_rate_drop", "higher"),
    "pass_k": ("max_pass_k_drop", "higher"),
    "latency_p95_s": ("max_latency_p95_increase_s", "lower"),
}
EPS = 1e-12


class Thresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How much worse a metric may get before the gate fails, and absolute floors (None: not gated)."""

    max_pass_rate_drop: float | None = 0.10
    max_pass_k_drop: float | None = 0.10
    max_latency_p95_increase_s: float | None = None
    fail_on_missing_scenario: bool = True
    min_pass_rate: float | None = None  # per scenario
    min_pass_k: float | None = None  # per scenario; n < k fails it
    max_infra_rate: float | None = 0.10  # crosstalk's own faults, of all conversations
    allow_not_judged: bool = False


class Row(msgspec.Struct, frozen=True, kw_only=True):
    scenario_id: str
    metric: str
    baseline: float | None
    candidate: float | None
    delta: float | None
    change: Change
    regression: bool


class Comparison(msgspec.Struct, frozen=True, kw_only=True):
    rows: list[Row]
    newly_failing: dict[str, list[str]]  # scenario -> criteria that fail now and did not before
    no_longer_failing: dict[str, list[str]]
    violations: list[str]

    @property
    def passed(self) -> bool:
        return not self.violations


def load_thresholds(path: Path | None, overrides: dict[str, Any]) -> Thresholds:
    """Thresholds from a YAML/JSON file (keys as in :class:`Thresholds`), then command-line overrides."""
    base: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must be a mapping of threshold names to numbers")
        base = raw
    try:
        th = msgspec.convert({**base, **{k: v for k, v in overrides.items() if v is not None}}, Thresholds)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path or 'thresholds'}: {exc}") from None
    for name in ("min_pass_rate", "min_pass_k", "max_infra_rate", "max_pass_rate_drop", "max_pass_k_drop"):
        value = getattr(th, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {value} is not a fraction between 0 and 1")
    return th


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or "scenarios" not in data:
        raise ValueError(f"{path}: not a crosstalk report (no 'scenarios')")
    return data


def _failing(report: dict[str, Any]) -> dict[str, set[str]]:
    return {s["scenario_id"]: set(s.get("failing_criteria") or {}) for s in report["scenarios"]}


def _why_missing(metric: str, row: dict[str, Any]) -> str:
    if metric == "pass_k" and row.get("n", 0) < row.get("k", 1):
        return f"pass^k: n < k ({row.get('n', 0)} judged trial(s), k = {row.get('k')})"
    if not row.get("n"):
        return "no judged trial"
    return "no value"


def _relative(sid: str, metric: str, old: float | None, new: float | None, cand: dict[str, Any],
              th: Thresholds, violations: list[str]) -> Row:
    limit_name, better = METRICS[metric]
    limit = getattr(th, limit_name)
    if old is None:
        return Row(scenario_id=sid, metric=metric, baseline=old, candidate=new, delta=None, change="n/a",
                   regression=False)
    if new is None:  # the baseline showed it; the candidate cannot: missing data never passes
        violations.append(f"{sid}: {metric} {old:.3f} in the baseline, missing in the candidate "
                          f"({_why_missing(metric, cand)})")
        return Row(scenario_id=sid, metric=metric, baseline=old, candidate=None, delta=None, change="missing",
                   regression=True)
    delta = new - old
    worse_by = -delta if better == "higher" else delta
    change: Change = "same" if abs(delta) < EPS else ("worse" if worse_by > 0 else "better")
    regression = limit is not None and worse_by > limit + EPS
    if regression:
        violations.append(f"{sid}: {metric} {old:.3f} -> {new:.3f} (worse by {worse_by:.3f}, "
                          f"allowed {limit:g}: {limit_name})")
    return Row(scenario_id=sid, metric=metric, baseline=old, candidate=new, delta=delta, change=change,
               regression=regression)


def _absolute(sid: str, row: dict[str, Any], th: Thresholds, violations: list[str]) -> None:
    for metric, floor in (("pass_rate", th.min_pass_rate), ("pass_k", th.min_pass_k)):
        if floor is None:
            continue
        value = row.get(metric)
        if value is None:
            violations.append(f"{sid}: {metric} missing ({_why_missing(metric, row)}), at least {floor:g} required")
        elif value < floor - EPS:
            violations.append(f"{sid}: {metric} {value:.3f} below {floor:g} (min_{metric})")


def _totals(cand: dict[str, Any], th: Thresholds, violations: list[str]) -> None:
    t = cand.get("totals") or {}
    conversations = int(t.get("conversations") or 0)
    judged = int(t.get("judged", t.get("n", 0)) or 0)
    infra = int(t.get("infra_failures") or 0)
    if judged == 0:
        violations.append(f"candidate: no judged conversation ({conversations} conversation(s), "
                          f"{infra} infrastructure failure(s)): nothing shows the agent passing")
    if th.max_infra_rate is not None and conversations and infra / conversations > th.max_infra_rate + EPS:
        reasons = ", ".join(f"{k} ×{v}" for k, v in (t.get("infra_reasons") or {}).items())
        violations.append(f"candidate: {infra}/{conversations} conversations were infrastructure failures "
                          f"({reasons or 'crosstalk faults'}), more than max_infra_rate {th.max_infra_rate:g}")
    not_judged = int(t.get("not_judged") or 0)
    if not_judged and not th.allow_not_judged:
        violations.append(f"candidate: {not_judged} conversation(s) have expectations no judge decided "
                          "(no judge configured: set CROSSTALK_JUDGE_URL or OPENAI_BASE_URL, or allow it "
                          "with --allow-not-judged)")


def compare(base: dict[str, Any] | None, cand: dict[str, Any], th: Thresholds) -> Comparison:
    b = {s["scenario_id"]: s for s in (base or {}).get("scenarios", [])}
    c = {s["scenario_id"]: s for s in cand["scenarios"]}
    rows: list[Row] = []
    violations: list[str] = []
    _totals(cand, th, violations)
    for sid in sorted(b.keys() | c.keys()):
        if sid not in c:
            if th.fail_on_missing_scenario:
                violations.append(f"{sid}: in the baseline, missing from the candidate")
            continue
        _absolute(sid, c[sid], th, violations)
        for metric in METRICS:
            rows.append(_relative(sid, metric, b.get(sid, {}).get(metric), c[sid].get(metric), c[sid], th,
                                  violations))
    fb, fc = _failing(base or {"scenarios": []}), _failing(cand)
    newly = {sid: sorted(fc[sid] - fb.get(sid, set())) for sid in fc if fc[sid] - fb.get(sid, set())}
    fixed = {sid: sorted(fb[sid] - fc.get(sid, set())) for sid in fb if sid in fc and fb[sid] - fc[sid]}
    return Comparison(rows=rows, newly_failing=newly, no_longer_failing=fixed, violations=violations)
