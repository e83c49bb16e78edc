"""``crosstalk compare``: what got better or worse between two reports, and whether it passes the gate.

Pure: two report dicts (cli/report.py's JSON) and :class:`Thresholds` in, a
:class:`Comparison` out. Per scenario it compares pass rate, pass^k and the agent's latency
p95, and lists the criteria that newly fail or no longer fail (the judges' reasons). A
scenario of the baseline missing from the candidate is a regression too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

Direction = Literal["higher", "lower"]
Change = Literal["better", "worse", "same", "n/a"]
METRICS: dict[str, tuple[str, Direction]] = {
    "pass_rate": ("max_pass_rate_drop", "higher"),
    "pass_k": ("max_pass_k_drop", "higher"),
    "latency_p95_s": ("max_latency_p95_increase_s", "lower"),
}


class Thresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How much worse a metric may get before the gate fails (None: not gated)."""

    max_pass_rate_drop: float | None = 0.10
    max_pass_k_drop: float | None = 0.10
    max_latency_p95_increase_s: float | None = None
    fail_on_missing_scenario: bool = True


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


def load_thresholds(path: Path | None, overrides: dict[str, Any]) -> Thresholds:
    """Thresholds from a YAML/JSON file (keys as in :class:`Thresholds`), then command-line overrides."""
    base: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must be a mapping of threshold names to numbers")
        base = raw
    try:
        return msgspec.convert({**base, **{k: v for k, v in overrides.items() if v is not None}}, Thresholds)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path or 'thresholds'}: {exc}") from None


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or "scenarios" not in data:
        raise ValueError(f"{path}: not a crosstalk report (no 'scenarios')")
    return data


def _failing(report: dict[str, Any]) -> dict[str, set[str]]:
    return {s["scenario_id"]: set(s.get("failing_criteria") or {}) for s in report["scenarios"]}


def compare(base: dict[str, Any], cand: dict[str, Any], th: Thresholds) -> Comparison:
    b = {s["scenario_id"]: s for s in base["scenarios"]}
    c = {s["scenario_id"]: s for s in cand["scenarios"]}
    rows: list[Row] = []
    violations: list[str] = []
    for sid in sorted(b.keys() | c.keys()):
        if sid not in c:
            if th.fail_on_missing_scenario:
                violations.append(f"{sid}: in the baseline, missing from the candidate")
            continue
        for metric, (limit_name, better) in METRICS.items():
            old = b.get(sid, {}).get(metric)
            new = c[sid].get(metric)
            if old is None or new is None:
                rows.append(Row(scenario_id=sid, metric=metric, baseline=old, candidate=new, delta=None,
                                change="n/a", regression=False))
                continue
            delta = new - old
            worse_by = -delta if better == "higher" else delta
            change: Change = "same" if abs(delta) < 1e-12 else ("worse" if worse_by > 0 else "better")
            limit = getattr(th, limit_name)
            regression = limit is not None and worse_by > limit + 1e-12
            if regression:
                violations.append(f"{sid}: {metric} {old:.3f} -> {new:.3f} (worse by {worse_by:.3f}, "
                                  f"allowed {limit:g}: {limit_name})")
            rows.append(Row(scenario_id=sid, metric=metric, baseline=old, candidate=new, delta=delta,
                            change=change, regression=regression))
    fb, fc = _failing(base), _failing(cand)
    newly = {sid: sorted(fc[sid] - fb.get(sid, set())) for sid in fc if fc[sid] - fb.get(sid, set())}
    fixed = {sid: sorted(fb[sid] - fc.get(sid, set())) for sid in fb if sid in fc and fb[sid] - fc[sid]}
    return Comparison(rows=rows, newly_failing=newly, no_longer_failing=fixed, violations=violations)
