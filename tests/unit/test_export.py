"""`crosstalk export`: one record per conversation, the same in JSONL and Parquet, UTF-8 byte-exact."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
from test_report import make_batch
from typer.testing import CliRunner

from cli import app as cli_app
from services.judge.batch import judge_batch
from shared import scenarios


def test_jsonl_and_parquet_hold_the_same_records(tmp_path: Path) -> None:
    files = make_batch(tmp_path / "data", "b-exp")
    asyncio.run(judge_batch(files, scenarios.library(), None))
    env = {"CROSSTALK_DATA_DIR": str(tmp_path / "data")}
    for fmt in ("jsonl", "parquet"):
        res = CliRunner().invoke(cli_app.app, ["export", "b-exp", "--format", fmt], env=env)
        assert res.exit_code == 0 and "6 conversation(s)" in res.output, res.output
    rows = [json.loads(line) for line in (files.dir / "dataset.jsonl").read_text(encoding="utf-8").splitlines()]
    assert pq.read_table(files.dir / "dataset.parquet").to_pylist() == rows
    assert [r["conversation_id"] for r in rows] == [f"b-exp-{i:05d}" for i in range(6)]
    first = rows[0]
    assert (first["scenario_id"], first["trial"], first["outcome"], first["recording"]) == (
        "en-billing-dispute", 1, "completed", "recordings/b-exp-00000.wav")
    assert first["persona"]["name"] and first["verdict"] == "inconclusive"  # no judge: expectations not judged
    assert rows[5]["outcome"] == "failed" and rows[5]["status"] == "infra_failure" and rows[5]["verdict"] is None
    hinglish = scenarios.library()["hinglish-cancellation"]
    texts = [t["text"] for t in rows[1]["turns"]]
    assert [t.encode() for t in texts] == [line.text.encode() for line in hinglish.script]  # byte-exact
    assert abs(rows[1]["turns"][1]["first_token_s"] - 0.15) < 1e-9


def test_a_bad_batch_id_or_out_path_changes_nothing(tmp_path: Path) -> None:
    env = {"CROSSTALK_DATA_DIR": str(tmp_path / "data")}
    res = CliRunner().invoke(cli_app.app, ["export", "../etc"], env=env)
    assert res.exit_code == 2 and "batch_id" in res.output
    make_batch(tmp_path / "data", "b-x")
    res = CliRunner().invoke(cli_app.app, ["export", "b-x", "--out", str(tmp_path)], env=env)
    assert res.exit_code == 2 and "is a folder" in res.output
    assert not list((tmp_path / "data" / "batches" / "b-x").glob("dataset.*"))


def test_json_output_of_the_commands_that_print_results(tmp_path: Path) -> None:
    env = {"CROSSTALK_DATA_DIR": str(tmp_path / "data")}
    make_batch(tmp_path / "data", "b-js")
    runner = CliRunner()
    judged = json.loads(runner.invoke(cli_app.app, ["judge", "b-js", "--json"], env=env).output)
    assert judged["judged_now"] == 6 and judged["judged"]["verdicts"]["infra_failure"] == 1
    rep = json.loads(runner.invoke(cli_app.app, ["report", "b-js", "--json"], env=env).output)
    assert rep["totals"]["conversations"] == 6 and set(rep["files"]) == {"json", "html", "junit"}
    lib = json.loads(runner.invoke(cli_app.app, ["scenarios", "--json"], env=env).output)
    assert sum(s["default"] for s in lib) == 1 and {"en-account-help", "hi-account-help"} <= {s["id"] for s in lib}
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenarios:\n  - label: x\n    instructions: y\n    agent_expectation: z\n", encoding="utf-8")
    res = runner.invoke(cli_app.app, ["scenarios", "validate", str(bad), "--json"], env=env)
    got = json.loads(res.output)
    assert res.exit_code == 2 and got[0]["ok"] is False and "agent_expectations" in got[0]["errors"][0]
