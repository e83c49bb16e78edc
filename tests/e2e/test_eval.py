"""Scenarios, judgments, trials, report and regression gate on the real stack (`just up` on free ports).

Everything real (nats-server, livekit-server, dispatcher, allocator, sink, judge, worker) but
the models. The agents' model is the scripted model (it plays each scenario's offline script,
which the batch carries inline to the worker). **The judge model is the same scripted model
standing in for an LLM judge** (CROSSTALK_JUDGE_URL points the judge service at it): it is
asked through livekit-agents' evals judges exactly as a real model would be, and answers by
a fixed rule instead of understanding (services/model/judge.py: every "quoted" phrase of an
expectation must appear in an agent turn -> pass, else fail).

The scenarios file is a LiveKit ``scenarios.yaml`` (multi-line instructions, tag maps, nested
userdata, fields crosstalk does not know) loaded unchanged; each scenario runs k=3 times.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from stack import ROOT, Stack, running_stack
from support.chromium import render

pytestmark = pytest.mark.e2e

SCENARIOS = """\
name: crosstalk-e2e-regression
id: sg-e2e-001
owner: qa-team            # not LiveKit's, not crosstalk's: kept as is
scenarios:
  - label: Locked out (regression)
    instructions: |
      You are Raj, locked out of online banking this morning.
      Speak briefly.
        (This indented line and the blank line below are part of the text.)

      Ask to be unlocked.
    agent_expectations: |
      - Says the account is "unlocked".
      - Tells the caller they are "verified" before changing anything.
    tags:
      team: payments
      priority: "1"
    userdata:
      account: {id: ACC-4417, flags: [locked, vip], limits: {daily: 5000}}
    future_livekit_field: {kept: true}
    crosstalk:
      id: reg-locked-out
      language: en
      checks:
        must_mention: [unlocked]
        must_not_say: [PIN]
        ended_by: support
        within_turns: 6
        language: true
        tool_called: [{name: end_conversation, by: support}]
      script:
        - {role: customer, text: "Hi, I'm locked out of my account."}
        - {role: support, text: "I can help. You're verified from your registered number."}
        - {role: customer, text: "Great, thanks."}
        - {role: support, text: "Your account is unlocked now. Goodbye!", end: true}
  - label: Upsell attempt (regression)
    instructions: >
      You are Mia and you want to cancel.
      You never accept offers.
    agent_expectations: "- Offers a \\"discount\\" before cancelling."
    tags: {team: retention}
    userdata: {plan: {name: premium, months: 14}}
    crosstalk:
      id: reg-upsell
      language: en
      checks:
        must_mention: [discount]
        ended_by: support
      script:
        - {role: customer, text: "Please cancel my plan."}
        - {role: support, text: "Done, your plan is cancelled. Bye!", end: true}
  - label: पेंशन की जानकारी
    instructions: आप कमला देवी हैं और पूछती हैं कि पेंशन आई या नहीं।
    agent_expectations: '- बताता है कि "पेंशन" आ गई है।'
    tags: {language: hi}
    crosstalk:
      id: reg-hi-pension
      language: hi
      checks: {must_mention: [पेंशन], language: true, ended_by: support}
      script:
        - {role: customer, text: "नमस्ते बेटा, मेरी पेंशन आई क्या?"}
        - {role: support, text: "जी माँजी, आपकी पेंशन के 12,500 रुपये आ गए हैं। नमस्ते!", end: true}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("eval")
    scen_dir = tmp / "scenarios"
    (scen_dir / "regression").mkdir(parents=True)
    (scen_dir / "regression" / "support.yaml").write_text(SCENARIOS, encoding="utf-8")
    with running_stack(tmp, scripted_judge=True, CROSSTALK_MODEL_TTFT_MS="20", CROSSTALK_MODEL_TOKENS_PER_S="2000",
                       CROSSTALK_JOIN_DEADLINE_S="30", CROSSTALK_SCENARIO_DIR=str(scen_dir)) as s:
        yield s


async def start(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(stack.nats_url)
    try:
        reply = await nc.request("batch.start", json.dumps(body).encode(), timeout=30)
    finally:
        await nc.drain()
    return json.loads(reply.data)


def wait_judgments(stack: Stack, batch_id: str, n: int, timeout: float = 300) -> list[dict[str, Any]]:
    """The judgments once the judge says judging is done (judged.json, its BatchJudged): no polling of the folder."""
    batch_dir = stack.data_dir / "batches" / batch_id
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (batch_dir / "judged.json").is_file():
            judged = json.loads((batch_dir / "judged.json").read_bytes())
            files = sorted((batch_dir / "judgments").glob("*.json"))
            assert judged["conversations"] == len(files) == n, judged
            out = [json.loads(p.read_bytes()) for p in files]
            by_verdict = {v: sum((j["verdict"] or "infra_failure") == v for j in out) for v in judged["verdicts"]}
            assert by_verdict == judged["verdicts"], (by_verdict, judged)
            return out
        time.sleep(0.5)
    stack.dump_logs(60)
    raise AssertionError(f"{batch_id}: not judged after {timeout}s")


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=stack.env, capture_output=True,
                          text=True, timeout=120)


async def test_rejections_name_the_field(stack: Stack) -> None:
    for body, field, fragment in [
        ({"scenarios": "../support.yaml"}, "scenarios", "must not contain '..'"),
        ({"scenarios": "/etc/passwd"}, "scenarios", "relative to the scenario directory"),
        ({"scenarios": "regression/none.yaml"}, "scenarios", "no file"),
        ({"scenarios": "regression/support.yaml", "trials": 2, "conversations": 5}, "conversations", "3 x 2 = 6"),
        ({"scenarios": [{"label": "x", "instructions": "y", "tags": {"n": 1}}]}, "scenarios[0].tags.n", "strings"),
        ({"scenarios": "regression/support.yaml", "scenario": "en-account-help"}, "scenarios", "not both"),
    ]:
        reply = await start(stack, body)
        assert reply["accepted"] is False and reply["field"] == field and fragment in reply["reason"], (body, reply)


async def test_livekit_file_k3_judged_reported_rendered_and_gated(stack: Stack, tmp_path: Path) -> None:
    reply = await start(stack, {"batch_id": "ev-base", "scenarios": "regression/support.yaml", "trials": 3})
    assert reply["accepted"], reply
    judgments = wait_judgments(stack, "ev-base", 9)
    batch_dir = stack.data_dir / "batches" / "ev-base"

    # The file's entries reached the batch unchanged (multi-line text, tags, nested userdata, unknown fields).
    plan = json.loads((batch_dir / "plan.json").read_bytes())
    assert [s["doc"] for s in plan["scenarios"]] == yaml.safe_load(SCENARIOS)["scenarios"]
    assert plan["trials"] == 3 and plan["conversations"] == 9 and plan["source"] == "regression/support.yaml"

    by = {sid: [j for j in judgments if j["scenario_id"] == sid] for sid in ("reg-locked-out", "reg-upsell", "reg-hi-pension")}
    assert sorted(j["trial"] for j in by["reg-locked-out"]) == [1, 2, 3]
    assert all(j["status"] == "judged" for j in judgments), [j["infra_failure"] for j in judgments]
    for j in by["reg-locked-out"]:
        assert j["verdict"] == "pass", j["criteria"]
        llm = [c for c in j["criteria"] if c["kind"] == "llm"]
        assert len(llm) == 2 and all(c["verdict"] == "pass" for c in llm) and j["judge_model"] == "crosstalk-scripted"
        assert "Your account is unlocked now." in llm[0]["evidence"]  # the judge cites the agent's turn
    hindi = yaml.safe_load(SCENARIOS)["scenarios"][2]["crosstalk"]["script"]
    for j in by["reg-hi-pension"]:  # Devanagari from the file to the transcript byte for byte, judged in Hindi
        assert j["verdict"] == "pass", j["criteria"]
        lines = (batch_dir / "conversations" / f"{j['conversation_id']}.jsonl").read_bytes().splitlines()
        assert [json.loads(line)["text"].encode() for line in lines] == [t["text"].encode() for t in hindi]
    for j in by["reg-upsell"]:
        failed = {c["name"] for c in j["criteria"] if c["verdict"] == "fail"}
        assert j["verdict"] == "fail" and "must_mention: discount" in failed
        assert any(c["kind"] == "llm" and c["verdict"] == "fail" for c in j["criteria"])

    res = cli(stack, "report", "ev-base")
    assert res.returncode == 0, res.stderr
    report = json.loads((batch_dir / "report.json").read_bytes())
    rows = {s["scenario_id"]: s for s in report["scenarios"]}
    for sid, js in by.items():  # the report's numbers are the stored verdicts'
        passed = sum(j["verdict"] == "pass" for j in js)
        assert (rows[sid]["n"], rows[sid]["passed"], rows[sid]["k"]) == (len(js), passed, 3)
        assert rows[sid]["pass_rate"] == passed / len(js)
        assert rows[sid]["pass_k"] == (1.0 if passed == 3 else 0.0)
    assert report["totals"]["infra_failures"] == 0 and report["totals"]["judged"] == 9
    suites = ET.parse(batch_dir / "junit.xml").getroot()
    assert sum(int(s.get("tests")) for s in suites) == 9 and sum(int(s.get("failures")) for s in suites) == 3

    shot = tmp_path / "report.png"
    page = await render(batch_dir / "report.html", shot)
    assert page.errors == []
    assert len(page.charts) == 3 and all(c["width"] > 100 and c["height"] > 100 and c["bars"] > 0 for c in page.charts)
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ROOT / "data").mkdir(exist_ok=True)
    (ROOT / "data" / "e2e-report.png").write_bytes(shot.read_bytes())  # for a human to look at

    # A candidate made worse on purpose: the same scenarios inline, the agent no longer says "unlocked".
    worse = yaml.safe_load(SCENARIOS)["scenarios"]
    worse[0]["crosstalk"]["script"][3]["text"] = "I have reset a few things on your side. Goodbye!"
    reply = await start(stack, {"batch_id": "ev-worse", "scenarios": worse, "trials": 3})
    assert reply["accepted"], reply
    wait_judgments(stack, "ev-worse", 9)
    assert cli(stack, "report", "ev-worse").returncode == 0
    gate = cli(stack, "compare", "ev-base", "ev-worse")
    assert gate.returncode == 1, gate.stdout + gate.stderr
    assert "regression: reg-locked-out: pass_rate 1.000 -> 0.000" in gate.stderr
    assert "newly failing in reg-locked-out" in gate.stdout and "must_mention: unlocked" in gate.stdout
    same = cli(stack, "compare", "ev-base", str(batch_dir / "report.json"))
    assert same.returncode == 0, same.stdout + same.stderr
    await asyncio.sleep(0)
