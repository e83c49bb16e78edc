"""The `crosstalk` CLI without NATS: the progress tally, the summary, input validation, batch show, scenarios."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from cli import app as cli_app
from cli import progress, remote
from shared.contracts import (
    BatchAccepted,
    BatchFinished,
    BatchSpec,
    ContractError,
    ConversationDispatched,
    ConversationJoined,
    ConversationSettled,
    StartBatch,
)

T0 = 1_700_000_000.0
BID = "b-unit"


def spec(n: int = 3) -> BatchSpec:
    return BatchSpec(batch_id=BID, conversations=n, concurrency=2, scenario="en-account-help",
                     language="en", max_turns=8, mode="text")


def dispatched(conv: str, attempt: int = 1, at: float = T0 + 1) -> ConversationDispatched:
    return ConversationDispatched(batch_id=BID, conversation_id=conv, attempt=attempt, room=f"r-{conv}-{attempt}", at=at)


def settled(conv: str, outcome: str, reason: str, *, attempt: int = 1, retry: bool = False,
            at: float = T0 + 10) -> ConversationSettled:
    return ConversationSettled(batch_id=BID, conversation_id=conv, attempt=attempt, outcome=outcome,  # type: ignore[arg-type]
                               reason=reason, retry=retry, at=at)


def finished(status: str = "completed", completed: int = 3, failed: int = 0, end: float = T0 + 60) -> BatchFinished:
    return BatchFinished(batch_id=BID, status=status, requested=completed + failed,  # type: ignore[arg-type]
                         completed=completed, failed=failed, started_at=T0, finished_at=end)


def test_progress_counts_retries_once_and_ignores_redeliveries() -> None:
    p = progress.BatchProgress(BID)
    p.apply(BatchAccepted(spec=spec(3), at=T0))
    for c in ("c0", "c1", "c2"):
        p.apply(dispatched(c))
    assert (p.requested, p.done, p.in_flight) == (3, 0, 3)

    p.apply(ConversationJoined(batch_id=BID, conversation_id="c0", attempt=1, join_seconds=1.2, at=T0 + 2))
    p.apply(settled("c0", "completed", "end_conversation:support"))
    p.apply(settled("c0", "completed", "end_conversation:support"))  # redelivered
    assert (p.completed, p.failed, p.in_flight) == (1, 0, 2)

    # c1 failed but will be retried: not a final failure, not in flight until re-dispatched.
    p.apply(settled("c1", "failed", "join_timeout: no agent", retry=True))
    assert (p.completed, p.failed, p.in_flight) == (1, 0, 1)
    p.apply(dispatched("c1", attempt=2, at=T0 + 20))
    assert p.in_flight == 2
    p.apply(settled("c1", "completed", "max_turns", attempt=2, at=T0 + 30))

    p.apply(settled("c2", "failed", "agent_error: boom", at=T0 + 40))
    assert (p.completed, p.failed, p.done, p.in_flight) == (2, 1, 3, 0)
    assert p.failure_reasons == {"agent_error": 1}
    # 3 settled in 40 s of batch time
    assert p.rate_per_min(T0 + 40) == pytest.approx(4.5)

    p.apply(finished("failed", completed=2, failed=1, end=T0 + 45))
    assert p.finished is not None and p.last_at == T0 + 45
    assert p.elapsed(T0 + 999) == 45.0  # a finished batch's wall time no longer grows


def test_progress_trusts_batch_finished_counts() -> None:
    p = progress.BatchProgress(BID)
    p.apply(finished("completed", completed=5, failed=0))
    assert (p.requested, p.completed, p.failed, p.in_flight) == (5, 5, 0, 0)
    assert p.started_at == T0


def test_progress_before_any_event_is_empty() -> None:
    p = progress.BatchProgress(BID)
    assert (p.requested, p.done, p.in_flight, p.rate_per_min(T0)) == (None, 0, 0, 0.0)
    assert progress.status_line(p, T0) == f"batch {BID}: 0/? settled (0 completed, 0 failed), 0 in flight, 0.0 conv/min"


events = st.lists(
    st.tuples(
        st.sampled_from(["c0", "c1", "c2", "c3"]),
        st.integers(min_value=1, max_value=3),
        st.sampled_from(["dispatch", "completed", "failed", "retry"]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_progress_never_counts_a_conversation_twice(seq: list[tuple[str, int, str]]) -> None:
    p = progress.BatchProgress(BID)
    p.apply(BatchAccepted(spec=spec(4), at=T0))
    for conv, attempt, kind in seq:
        if kind == "dispatch":
            p.apply(dispatched(conv, attempt))
        else:
            p.apply(settled(conv, "completed" if kind == "completed" else "failed", "agent_left",
                            attempt=attempt, retry=kind == "retry"))
        assert p.completed + p.failed <= 4
        assert p.in_flight >= 0
        assert sum(p.failure_reasons.values()) == p.failed


def test_summary_names_counts_reasons_rate_and_results(tmp_path: Path) -> None:
    p = progress.BatchProgress(BID)
    p.apply(BatchAccepted(spec=spec(4), at=T0))
    p.apply(settled("c0", "completed", "max_turns"))
    p.apply(settled("c1", "failed", "join_timeout: x"))
    p.apply(settled("c2", "failed", "join_timeout: y"))
    p.apply(settled("c3", "failed", "agent_error"))
    p.apply(finished("failed", completed=1, failed=3, end=T0 + 120))
    lines = progress.summary_lines(p, tmp_path / "batches" / BID, T0 + 500)
    assert lines[0] == f"batch {BID} failed"
    assert "1 completed, 3 failed, of 4" in lines[1]
    assert "failures: join_timeout 2, agent_error 1" in lines[2]
    assert "wall time: 2m00s, 2.0 conv/min" in lines[3]
    assert lines[4] == f"  results: {tmp_path / 'batches' / BID}/"


def test_format_duration() -> None:
    assert progress.format_duration(3.25) == "3.2s"
    assert progress.format_duration(83) == "1m23s"
    assert progress.format_duration(3 * 3600 + 62) == "3h01m02s"


def test_start_body_sends_only_given_fields_and_names_bad_ones() -> None:
    body = cli_app.start_body(batch_id="nightly-1", conversations=200, concurrency=None, scenario="hi-account-help",
                          language="hi", max_turns=None, mode="text")
    assert json.loads(body) == {"batch_id": "nightly-1", "conversations": 200, "scenario": "hi-account-help",
                                "language": "hi", "mode": "text"}
    assert msgspec.json.decode(body, type=StartBatch).conversations == 200
    for kwargs, field in [
        ({"conversations": 0}, "conversations"),
        ({"mode": "audio"}, "mode"),
        ({"batch_id": "Bad.Id"}, "batch_id"),
        ({"batch_id": "a>b"}, "batch_id"),
        ({"max_turns": 1000}, "max_turns"),
        ({"scenario": "../etc"}, "scenario"),
    ]:
        with pytest.raises(ContractError) as exc:
            cli_app.start_body(**kwargs)
        assert exc.value.field == field


def test_redact_url_hides_credentials() -> None:
    assert remote.redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    red = remote.redact_url("nats://alice:s3cret@nats.example:4222")
    assert "s3cret" not in red and "alice" not in red and red.endswith("nats.example:4222")
    assert "tok" not in remote.redact_url("tls://tok@10.0.0.1")


# --------------------------------------------------------------------------- commands, in process

runner = CliRunner()


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A closed port: these commands must finish without touching NATS.
    return {"NATS_URL": "nats://127.0.0.1:9", "CROSSTALK_DATA_DIR": str(tmp_path), **extra}


@pytest.mark.parametrize("bad", ["Bad", "a.b", "a*", ">", "../x", "-x", "a b", "x" * 65])
def test_watch_and_show_refuse_an_invalid_id(tmp_path: Path, bad: str) -> None:
    for cmd in (["batch", "watch", bad], ["batch", "show", bad]):
        res = runner.invoke(cli_app.app, cmd, env=env(tmp_path))
        assert res.exit_code == cli.EXIT_BAD_INPUT, res.output
        assert "batch_id" in res.output


def test_start_rejects_a_bad_option_before_sending(tmp_path: Path) -> None:
    res = runner.invoke(cli_app.app, ["batch", "start", "-n", "0"], env=env(tmp_path))
    assert res.exit_code == cli.EXIT_BAD_INPUT
    assert "rejected: conversations:" in res.output
    res = runner.invoke(cli_app.app, ["batch", "start", "--mode", "smoke-signals"], env=env(tmp_path))
    assert res.exit_code == cli.EXIT_BAD_INPUT
    assert "'smoke-signals' is not one of 'text', 'voice'" in res.output.replace("\n", " ") or (
        "Invalid value for '--mode'" in res.output), res.output  # a choice: click names the option and the values


def test_bad_configuration_names_the_variable(tmp_path: Path) -> None:
    res = runner.invoke(cli_app.app, ["batch", "show", "b1"], env=env(tmp_path, CROSSTALK_METRICS_PORT="abc"))
    assert res.exit_code == cli.EXIT_BAD_INPUT
    assert "CROSSTALK_METRICS_PORT" in res.output


def write_batch(tmp_path: Path, batch_id: str, doc: dict[str, object], turns: int = 2) -> Path:
    folder = tmp_path / "batches" / batch_id
    (folder / "conversations").mkdir(parents=True)
    path = folder / "batch.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    for i in range(turns):
        (folder / "conversations" / f"c{i}.jsonl").write_text("{}\n")
    return path


def test_show_prints_the_batch_summary(tmp_path: Path) -> None:
    write_batch(tmp_path, "b1", {
        "batch_id": "b1", "status": "completed", "requested": 2, "completed": 2, "failed": 0,
        "started_at": T0, "finished_at": T0 + 83, "spec": {"scenario": "hi-account-help", "language": "hi"},
    })
    res = runner.invoke(cli_app.app, ["batch", "show", "b1"], env=env(tmp_path, COLUMNS="200"))
    assert res.exit_code == 0, res.output
    for text in ("status", "completed", "2023-11-14T22:13:20+00:00", "1m23s", "spec.scenario", "hi-account-help",
                 "2 file(s)"):
        assert text in res.output


def test_show_counts_the_room_audit_violations(tmp_path: Path) -> None:
    agent = {"identity": "agent-AJ_1", "kind": "agent", "role": "customer"}
    write_batch(tmp_path, "b3", {
        "batch_id": "b3", "status": "completed", "requested": 3, "completed": 3, "failed": 0,
        "conversations": {
            "b3-00000": {"attempts": 1, "participants": [agent], "violations": [
                {"kind": "no_grant", "identities": ["x"]}, {"kind": "third_agent", "identities": ["a", "b", "x"]}]},
            "b3-00001": {"attempts": 1, "participants": [agent], "violations": [
                {"kind": "two_of_one_role", "identities": ["a", "b"], "role": "customer"}]},
            "b3-00002": {"attempts": 1, "participants": [], "violations": []},
        },
    })
    assert progress.audit_counts(json.loads((tmp_path / "batches" / "b3" / "batch.json").read_text())) == {
        "two_of_one_role": 1, "no_grant": 1, "third_agent": 1, "unaudited": 1}
    res = runner.invoke(cli_app.app, ["batch", "show", "b3"], env=env(tmp_path, COLUMNS="200"))
    assert res.exit_code == 0, res.output
    for text in ("two of one role", "participant without a grant", "third agent", "no webhook reported"):
        assert text in res.output


def test_show_json_is_byte_exact_utf8(tmp_path: Path) -> None:
    path = write_batch(tmp_path, "b2", {"batch_id": "b2", "status": "running", "note": "खाता लॉक हो गया"})
    res = runner.invoke(cli_app.app, ["batch", "show", "b2", "--json"], env=env(tmp_path))
    assert res.exit_code == 0, res.output
    assert res.stdout_bytes == path.read_bytes() + b"\n"


def test_show_missing_or_broken_batch(tmp_path: Path) -> None:
    res = runner.invoke(cli_app.app, ["batch", "show", "nope"], env=env(tmp_path))
    assert res.exit_code == cli.EXIT_UNAVAILABLE
    assert "no batch.json" in res.output
    folder = tmp_path / "batches" / "broken"
    folder.mkdir(parents=True)
    (folder / "batch.json").write_text("{not json")
    res = runner.invoke(cli_app.app, ["batch", "show", "broken"], env=env(tmp_path))
    assert res.exit_code == cli.EXIT_UNAVAILABLE
    assert "batch.json" in res.output


def test_scenarios_lists_the_library(tmp_path: Path) -> None:
    res = runner.invoke(cli_app.app, ["scenarios"], env=env(tmp_path, COLUMNS="200"))
    assert res.exit_code == 0, res.output
    for sid in ("en-account-help (default)", "hi-account-help", "hinglish-refund"):
        assert sid in res.output
    assert "राज शर्मा" in res.output
