"""``crosstalk report``: a batch's judgments as JSON, a self-contained HTML page and JUnit XML.

Everything comes from the batch's files (services/judge/store.py): batch.json, plan.json, the
transcripts and the judgments. Per scenario: trials judged (n), passes (c), pass rate with its
Wilson interval, pass^k = C(c,k)/C(n,k) with k the batch's ``trials``, the agent's latency
(first token) p50/p95 and the turn counts. Infrastructure failures are counted apart and
are in no n. Inconclusive verdicts count in n and not in c (a trial that did not show a pass).
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
            "pass_k": pass_hat_k(c, n, k)}


def _scenario_rows(judgments: list[Judgment], k: int, languages: dict[str, str]) -> list[dict[str, Any]]:
    order: dict[str, list[Judgment]] = {}
    for j in judgments:
        order.setdefault(j.scenario_id, []).append(j)
    rows = []
    for sid, js in order.items():
        judged = [j for j in js if j.status == "judged"]
        c = sum(j.verdict == "pass" for j in judged)
        latency = [v for j in judged for v in j.first_token_s]
        failing = Counter(cr.name for j in judged for cr in j.criteria if cr.verdict == "fail")
        rows.append({
            "scenario_id": sid, "label": js[0].label, "language": languages.get(sid, ""), "k": k,
            "conversations": len(js), "n": len(judged), "passed": c,
            "failed": sum(j.verdict == "fail" for j in judged),
            "inconclusive": sum(j.verdict == "inconclusive" for j in judged),
            "infra_failures": len(js) - len(judged), **_rate(c, len(judged), k),
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
    judged = [j for j in judgments if j.status == "judged"]
    c = sum(j.verdict == "pass" for j in judged)
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
        "totals": {"conversations": len(judgments), "judged": len(judged), "passed": c,
                   "failed": sum(j.verdict == "fail" for j in judged),
                   "inconclusive": sum(j.verdict == "inconclusive" for j in judged),
                   "infra_failures": len(judgments) - len(judged), **_rate(c, len(judged), k)},
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


def junit_xml(data: dict[str, Any]) -> bytes:
    """One testsuite per scenario, one testcase per conversation: fail -> <failure>, infra -> <error>,
    inconclusive -> <skipped>."""
    root = ET.Element("testsuites", name=f"crosstalk {data['batch_id']}")
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for c in data["conversations"]:
        by_scenario.setdefault(c["scenario_id"], []).append(c)
    for sid, convs in by_scenario.items():
        suite = ET.SubElement(root, "testsuite", name=sid, tests=str(len(convs)),
                              failures=str(sum(c["verdict"] == "fail" for c in convs)),
                              errors=str(sum(c["status"] == "infra_failure" for c in convs)),
                              skipped=str(sum(c["verdict"] == "inconclusive" for c in convs)))
        for c in convs:
            case = ET.SubElement(suite, "testcase", classname=sid, name=f"{c['conversation_id']} (trial {c['trial']})")
            evidence = "\n".join(f"[{cr['verdict']}] {cr['name']}: {cr['evidence']}" for cr in c["criteria"])
            if c["status"] == "infra_failure":
                ET.SubElement(case, "error", message=f"infrastructure failure: {c['infra_failure']}")
            elif c["verdict"] == "fail":
                failed = [cr["name"] for cr in c["criteria"] if cr["verdict"] == "fail"]
                ET.SubElement(case, "failure", message="; ".join(failed)).text = evidence
            elif c["verdict"] == "inconclusive":
                ET.SubElement(case, "skipped", message="inconclusive").text = evidence
            if evidence:
                ET.SubElement(case, "system-out").text = evidence
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
