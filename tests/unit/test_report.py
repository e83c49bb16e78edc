"""The report from judgment files on disk: numbers equal the stored verdicts, infra failures apart, audio when recorded."""

from __future__ import annotations

import asyncio
import json
import re
import wave
import xml.etree.ElementTree as ET
from pathlib import Path

import msgspec
from typer.testing import CliRunner

from cli import app as cli_app
from cli import report
from services.judge.batch import judge_batch
from services.judge.checks import Criterion, Turn
from services.judge.llm import expectations
from services.judge.store import BatchFiles
from services.model import judge as scripted_judge
from shared import batch_plan, scenarios
from shared.contracts import BatchSpec, StartBatch, decode


def make_batch(root: Path, bid: str) -> BatchFiles:
    """2 scenarios x 3 trials: one conversation cut short (fails its checks), one infra failure."""
    lib = scenarios.library()
    chosen = [lib["en-billing-dispute"], lib["hinglish-cancellation"]]
    files = BatchFiles(root, bid)
    files.write_plan(BatchSpec(batch_id=bid, conversations=6, concurrency=2, scenario=chosen[0].id, language="mixed",
                               max_turns=8, mode="text", scenarios=batch_plan.batch_scenarios(chosen), trials=3))
    convs = {}
    for i in range(6):
        cid, sc = f"{bid}-{i:05d}", chosen[i % 2]
        lines = sc.script[:2] if i == 2 else sc.script
        path = files.transcript(cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"conversation_id": cid, "turn": n, "role": x.role, "text": x.text,
                                            "started_at": 0, "ended_at": 1, "attempt": 1, "batch_id": bid,
                                            "first_token_s": 0.1 + 0.05 * n}, ensure_ascii=False) + "\n"
                                for n, x in enumerate(lines)), encoding="utf-8")
        convs[cid] = ({"outcome": "failed", "reason": "agent_left", "attempts": 3} if i == 5 else
                      {"outcome": "completed", "attempts": 1, "turns": len(lines),
                       "ended": "max_turns" if i == 2 else "end_conversation: support"})
    files.batch_json.write_text(json.dumps({"batch_id": bid, "status": "failed", "conversations": convs}))
    rec = files.recording(f"{bid}-00000")
    rec.parent.mkdir(parents=True)
    with wave.open(str(rec), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"\0\0" * 1600)
    return files


class RuleJudge:
    """Stands in for an LLM judge (a paid API): services/model/judge.py's documented rule, in process."""

    model = "rule"

    async def judge(self, scenario: scenarios.Scenario, turns: list[Turn]) -> list[Criterion]:
        conv = "\n".join(("assistant: " if t.role == "support" else "user: ") + t.text for t in turns)
        out = []
        for i, text in enumerate(expectations(scenario.agent_expectations)):
            got = scripted_judge.verdict(f"Criteria: {text}\n\nConversation:\n{conv}\n\nEvaluate if ...")
            out.append(Criterion(name=f"expectation {i + 1}: {text}", kind="llm", evidence=got["reasoning"],
                                 verdict={"maybe": "inconclusive"}.get(got["verdict"], got["verdict"])))  # type: ignore[arg-type]
        return out


def test_report_numbers_are_the_stored_verdicts(tmp_path: Path) -> None:
    files = make_batch(tmp_path, "b-rep")
    asyncio.run(judge_batch(files, scenarios.library(), RuleJudge()))  # type: ignore[arg-type]
    paths = report.write(files)
    data = json.loads(paths["json"].read_bytes())
    stored = files.judgments()
    for row in data["scenarios"]:
        mine = [j for j in stored if j.scenario_id == row["scenario_id"]]
        judged = [j for j in mine if j.status == "judged"]
        assert row["n"] == len(judged) and row["passed"] == sum(j.verdict == "pass" for j in judged)
        assert row["infra_failures"] == len(mine) - len(judged)
    rows = {r["scenario_id"]: r for r in data["scenarios"]}
    assert (rows["en-billing-dispute"]["passed"], rows["en-billing-dispute"]["n"]) == (2, 3)
    assert rows["en-billing-dispute"]["pass_k"] == 0.0 and abs(rows["en-billing-dispute"]["pass_rate"] - 2 / 3) < 1e-9
    assert rows["hinglish-cancellation"]["n"] == 2 and rows["hinglish-cancellation"]["pass_k"] is None  # n < k
    assert rows["en-billing-dispute"]["failing_criteria"]["must_mention: refund"] == 1
    assert data["totals"] == {**data["totals"], "conversations": 6, "judged": 5, "passed": 4, "infra_failures": 1}

    html = paths["html"].read_text(encoding="utf-8")
    assert html.count("<svg class=\"chart\"") == 3 and "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained: nothing fetched from a network
    assert '<audio controls preload="none" src="recordings/b-rep-00000.wav">' in html and html.count("<audio") == 1
    assert "Infrastructure failure (not counted in any pass rate): agent_left" in html
    assert "Judging had not finished" in html  # judge_batch alone writes no judged.json
    assert "Gym membership cancel karna hai" in html

    suites = ET.parse(paths["junit"]).getroot()
    assert [(s.get("name"), s.get("tests"), s.get("failures"), s.get("errors")) for s in suites] == [
        ("en-billing-dispute", "3", "1", "0"), ("hinglish-cancellation", "3", "0", "1")]


def test_cli_report_and_start_body_with_inline_scenarios(tmp_path: Path) -> None:
    files = make_batch(tmp_path / "data", "b-cli")
    env = {"CROSSTALK_DATA_DIR": str(tmp_path / "data")}
    res = CliRunner().invoke(cli_app.app, ["report", "b-cli", "--wait", "0.2"], env=env)
    assert res.exit_code == 3 and "not judged after 0.2s" in res.output and "crosstalk judge b-cli" in res.output
    res = CliRunner().invoke(cli_app.app, ["judge", "b-cli"], env=env)  # no judge configured
    assert res.exit_code == 0 and "5 not judged (no judge)" in res.output, res.output
    res = CliRunner().invoke(cli_app.app, ["report", "b-cli", "--out", str(tmp_path / "out")], env=env)
    assert res.exit_code == 0, res.output
    assert ("0/5 passed (0.0%), 1 failed, 4 inconclusive (5 with expectations no judge decided); 1 infrastructure failure(s) apart"
            in res.output)
    junit = (tmp_path / "out" / "junit.xml").read_text(encoding="utf-8")
    assert junit.count("<error message=\"not judged") == 4 and "<skipped" not in junit
    # the gate: not-judged conversations fail it unless allowed; the infra failure (1 of 6) is over 0.1
    assert CliRunner().invoke(cli_app.app, ["compare", "b-cli"], env=env).exit_code == 1
    res = CliRunner().invoke(cli_app.app, ["compare", "b-cli", "--allow-not-judged", "--max-infra-rate", "0.2"],
                             env=env)
    assert res.exit_code == 0, res.output
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert 'src="../data/batches/b-cli/recordings/b-cli-00000.wav"' in html  # relative to where the page is
    assert files.judgment("b-cli-00000") is not None

    yaml_file = Path(scenarios.__file__).with_name("scenarios") / "support-hi.yaml"
    from cli.app import start_body
    from cli.evaluate import inline_entries

    body = decode(start_body(scenarios=inline_entries(yaml_file), trials=2), StartBatch)
    assert isinstance(body.scenarios, list) and len(body.scenarios) == 4 and body.trials == 2
    assert msgspec.UNSET is body.conversations
