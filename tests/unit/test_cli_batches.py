"""``crosstalk batch list`` and ``crosstalk batch cancel`` in process (cli/batches.py): no NATS needed here;
the cancel against a real dispatcher is in tests/integration/test_dispatcher_cancel.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from cli import app as cli_app

runner = CliRunner()


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A closed port: these commands must finish without touching NATS.
    return {"NATS_URL": "nats://127.0.0.1:9", "CROSSTALK_DATA_DIR": str(tmp_path), **extra}


def write(tmp_path: Path, batch_id: str, **doc: object) -> None:
    folder = tmp_path / "batches" / batch_id
    folder.mkdir(parents=True)
    (folder / "batch.json").write_text(json.dumps({"batch_id": batch_id, **doc}))


def test_batch_list_shows_the_data_dirs_batches_newest_first(tmp_path: Path) -> None:
    write(tmp_path, "old-one", status="cancelled", requested=10, completed=2, failed=1, cancelled=7,
          started_at=1_700_000_000, finished_at=1_700_000_100, mode="text")
    write(tmp_path, "new-one", status="running", requested=3, completed=0, failed=0, started_at=1_700_009_000,
          mode="voice", target_agent="acme")
    (tmp_path / "batches" / "broken").mkdir()
    (tmp_path / "batches" / "broken" / "batch.json").write_text("{not json")
    res = runner.invoke(cli_app.app, ["batch", "list", "--json"], env=env(tmp_path))
    assert res.exit_code == 0, res.output
    docs = json.loads(res.output)
    assert [d["batch_id"] for d in docs] == ["new-one", "old-one"]
    assert docs[1] == {"batch_id": "old-one", "status": "cancelled", "requested": 10, "completed": 2, "failed": 1,
                       "cancelled": 7, "started_at": 1_700_000_000, "finished_at": 1_700_000_100, "mode": "text",
                       "target_agent": None}
    res = runner.invoke(cli_app.app, ["batch", "list"], env=env(tmp_path))
    assert res.exit_code == 0, res.output
    header, first, second = res.output.splitlines()
    assert header.split()[:6] == ["ID", "STATUS", "REQUESTED", "COMPLETED", "FAILED", "CANCELLED"]
    assert first.split()[:2] == ["new-one", "running"] and first.split()[-2:] == ["voice", "acme"]
    assert second.split()[:6] == ["old-one", "cancelled", "10", "2", "1", "7"]


def test_batch_list_of_an_empty_data_dir(tmp_path: Path) -> None:
    res = runner.invoke(cli_app.app, ["batch", "list", "--json"], env=env(tmp_path))
    assert (res.exit_code, json.loads(res.output)) == (0, [])


@pytest.mark.parametrize("bad", ["Bad", "a.b", ">", "../x", "a b", "x" * 65])
def test_batch_cancel_refuses_an_invalid_id_without_sending_it(tmp_path: Path, bad: str) -> None:
    res = runner.invoke(cli_app.app, ["batch", "cancel", bad], env=env(tmp_path))
    assert res.exit_code == cli.EXIT_BAD_INPUT, res.output
    assert "batch_id" in res.output


def test_batch_cancel_says_when_nats_is_unreachable(tmp_path: Path) -> None:
    res = runner.invoke(cli_app.app, ["batch", "cancel", "b1", "--json"], env=env(tmp_path))
    assert res.exit_code == cli.EXIT_UNAVAILABLE, res.output
    assert "cannot reach NATS" in res.output


def test_batch_watch_shows_a_cancel_and_the_cancelled_end() -> None:
    from cli.progress import BatchProgress, status_line, summary_lines
    from shared.contracts import BatchAccepted, BatchCancelled, BatchFinished, BatchSpec

    p = BatchProgress("b1")
    p.apply(BatchAccepted(spec=BatchSpec(batch_id="b1", conversations=10, concurrency=2, scenario="en-account-help",
                                         language="en", max_turns=8, mode="text"), at=100.0))
    p.apply(BatchCancelled(batch_id="b1", never_started=7, in_flight=2, at=110.0))
    assert "cancelling: 7 never started, the running ones finish" in status_line(p, 111.0)
    p.apply(BatchFinished(batch_id="b1", status="cancelled", requested=10, completed=2, failed=1, cancelled=7,
                          started_at=100.0, finished_at=120.0))
    lines = summary_lines(p, Path("/data/batches/b1"), 121.0)
    assert lines[0] == "batch b1 cancelled"
    assert lines[1] == "  conversations: 2 completed, 1 failed, 7 never started (cancelled), of 10"
