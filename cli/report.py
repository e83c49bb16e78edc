"""``crosstalk report``: a batch's judgments as JSON, a self-contained HTML page and JUnit XML.

Everything comes from the batch's files (services/judge/store.py): batch.json, plan.json, the
transcripts and the judgments. Per scenario: trials judged (n), passes (c), pass rate with its
Wilson interval, pass^k = C(c,k)/C(n,k) with k the batch's ``trials`` (``null`` with
``pass_k_note: "n < k"`` when fewer trials were judged), the agent's latency (first token)
p50/p95 and the turn counts. The agent's own failures (silent, unresponsive, gone) are failed
trials in n; crosstalk's own faults are infrastructure failures, counted apart by reason and in
no n. Inconclusive verdicts, ``not_judged`` ones included, count in n and not in c (a trial that
did not show a pass). JUnit: fail and inconclusive -> ``<failure>``, crosstalk's faults and
not-judged criteria -> ``<error>``; nothing that is not a pass is green or skipped.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from cli import charts
from services.judge.core import Judgment
from services.judge.store import BatchFiles, pretty
from shared import scenarios as library
from shared.stats import pass_hat_k, percentile, wilson

REPORT_VERSION = 1
_TEMPLATES = Path(__file__).with_name("templates")


def _rate(c: int, n: int, k: int) -> dict[str, Any]:
    ci = wilson(c, n)
    return {"pass_rate": c / n if n else None, "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
            "pass_k": pass_hat_k(c, n, k), "pass_k_note": "n < k" if n < k else None}


def _counts(js: list[Judgment]) -> dict[str, Any]:
    """Verdict counts of some judgments; infra failures by their reason's label."""
    judged = [j for j in js if j.status == "judged"]
    infra = Counter(str(j.infra_failure or "").split(":", 1)[0] or "other" for j in js if j.status != "judged")
    return {"conversations": len(js), "n": len(judged), "passed": sum(j.verdict == "pass" for j in judged),
            "failed": sum(j.verdict == "fail" for j in judged),
            "inconclusive": sum(j.verdict == "inconclusive" for j in judged),
            "not_judged": sum(1 for j in judged if j.not_judged),
            "judge_errors": sum(1 for j in js if j.judge_error),
            "infra_failures": len(js) - len(judged), "infra_reasons": dict(sorted(infra.items()))}


def _scenario_rows(judgments: list[Judgment], k: int, languages: dict[str, str]) -> list[dict[str, Any]]:
    order: dict[str, list[Judgment]] = {}
    for j in judgments:
        order.setdefault(j.scenario_id, []).append(j)
    rows = []
    for sid, js in order.items():
        judged = [j for j in js if j.status == "judged"]
        counts = _counts(js)
        latency = [v for j in judged for v in j.first_token_s]
        failing = Counter(cr.name for j in judged for cr in j.criteria if cr.verdict == "fail")
        reasons = {cr.name: cr.evidence for j in judged for cr in j.criteria if cr.verdict == "fail"}
        rows.append({
            "scenario_id": sid, "label": js[0].label, "language": languages.get(sid, ""), "k": k,
            **counts, **_rate(counts["passed"], len(judged), k),
            "failing_reasons": dict(sorted(reasons.items())),
            "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
            "turns": [j.turns for j in judged], "failing_criteria": dict(sorted(failing.items())),
            "mean_score": (sum(j.score or 0 for j in judged) / len(judged)) if judged else None,
        })
    return rows


def build(files: BatchFiles) -> dict[str, Any]:
    """The report's data (the JSON export); every number comes from the judgment files."""
    doc = files.batch_doc() or {}
    spec = files.plan()
    judgments = files.judgments()
    k = spec.trials if spec is not None else 1
    languages = {s.id: (s.doc or {}).get("crosstalk", {}).get("language", "") for s in (spec.scenarios if spec else ())}
    lib = library.library()
    for j in judgments:
        languages.setdefault(j.scenario_id, lib[j.scenario_id].language if j.scenario_id in lib else "")
    totals = _counts(judgments)
    judged_event = files.judged()
    conversations = []
    for j in judgments:
        rec = files.recording(j.conversation_id)
        conversations.append({**msgspec.to_builtins(j), "recording": str(rec) if rec.is_file() else None,
                              "transcript": [{"turn": t.turn, "role": t.role, "text": t.text}
                                             for t in files.turns(j.conversation_id)]})
    return {
        "version": REPORT_VERSION, "batch_id": files.batch_id, "generated_at": time.time(),
        "status": doc.get("status"), "source": spec.source if spec else None, "trials": k,
        "judge_models": sorted({j.judge_model for j in judgments if j.judge_model}),
        "judging_finished": judged_event is not None,
        "totals": {**totals, "judged": totals["n"], **_rate(totals["passed"], totals["n"], k),
                   "infra_rate": totals["infra_failures"] / len(judgments) if judgments else None},
        "scenarios": _scenario_rows(judgments, k, languages),
        "conversations": conversations,
    }


# --------------------------------------------------------------------------- outputs


def render_html(data: dict[str, Any], out_dir: Path) -> str:
    env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    bars = [charts.RateBar(f"{s['label'] or s['scenario_id']}", s["pass_rate"], s["ci_low"], s["ci_high"], s["pass_k"])
            for s in data["scenarios"]]
    latency = [v for c in data["conversations"] if c["status"] == "judged" for v in c["first_token_s"]]
    turns = [c["turns"] for c in data["conversations"] if c["status"] == "judged"]
    audio = {c["conversation_id"]: os.path.relpath(c["recording"], out_dir)
             for c in data["conversations"] if c["recording"]}
    return env.get_template("report.html.j2").render(
        d=data, audio=audio,
        rate_chart=Markup(charts.pass_rates(bars, data["trials"])),
        latency_chart=Markup(charts.histogram(latency, "agent time to first token", "seconds")),
        turns_chart=Markup(charts.histogram([float(t) for t in turns], "turns per conversation", "turns",
                                            integer=True)),
        when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data["generated_at"])),
    )


def _outcome_element(case: ET.Element, c: dict[str, Any], evidence: str) -> str | None:
    """What a testcase says of a conversation (``error``, ``failure`` or None): a pass is the only green."""
    if c["status"] == "infra_failure":
        what = "judge error" if c.get("judge_error") else "infrastructure failure (crosstalk's, not the agent's)"
        ET.SubElement(case, "error", message=f"{what}: {c['infra_failure']}").text = evidence or None
        return "error"
    if c["verdict"] == "fail":
        failed = [cr["name"] for cr in c["criteria"] if cr["verdict"] == "fail"]
        ET.SubElement(case, "failure", message="; ".join(failed)).text = evidence
        return "failure"
    if c.get("not_judged"):
        ET.SubElement(case, "error", message=f"not judged: {c['not_judged']} criterion/criteria had no judge "
                                             "(set CROSSTALK_JUDGE_URL or OPENAI_BASE_URL)").text = evidence
        return "error"
    if c["verdict"] != "pass":
        ET.SubElement(case, "failure", message="inconclusive: no criterion failed, not every one passed"
                      ).text = evidence
        return "failure"
    return None


def junit_xml(data: dict[str, Any]) -> bytes:
    """One testsuite per scenario, one testcase per conversation: fail and inconclusive -> <failure>,
    crosstalk's faults (judge errors included) and not-judged criteria -> <error>; never <skipped>."""
    root = ET.Element("testsuites", name=f"crosstalk {data['batch_id']}")
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for c in data["conversations"]:
        by_scenario.setdefault(c["scenario_id"], []).append(c)
    for sid, convs in by_scenario.items():
        suite = ET.SubElement(root, "testsuite", name=sid, tests=str(len(convs)), skipped="0")
        kinds: Counter[str | None] = Counter()
        for c in convs:
            case = ET.SubElement(suite, "testcase", classname=sid, name=f"{c['conversation_id']} (trial {c['trial']})")
            evidence = "\n".join(f"[{cr['verdict']}] {cr['name']}: {cr['evidence']}" for cr in c["criteria"])
            kinds[_outcome_element(case, c, evidence)] += 1
            if evidence:
                ET.SubElement(case, "system-out").text = evidence
        suite.set("failures", str(kinds["failure"]))
        suite.set("errors", str(kinds["error"]))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write(files: BatchFiles, out_dir: Path | None = None) -> dict[str, Path]:
    """Write report.json, report.html and junit.xml (default: beside batch.json); their paths."""
    out = (out_dir or files.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = build(files)
    paths = {"json": out / "report.json", "html": out / "report.html", "junit": out / "junit.xml"}
    paths["json"].write_bytes(pretty(data))
    paths["html"].write_text(render_html(data, out), encoding="utf-8")
    paths["junit"].write_bytes(junit_xml(data))
    return paths
