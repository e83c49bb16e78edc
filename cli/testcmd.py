"""``crosstalk test``: your agent and a scenarios.yaml to a CI verdict in one command.

    crosstalk test --agent-name acme-support --scenarios scenarios.yaml -k 3 \\
        --agent-cmd "python agent.py start" --min-pass-rate 0.8 --junit junit.xml

Flag names follow ``lk agent simulate`` where they mean the same (``--agent-name``,
``--scenarios`` a local file). Steps, each failing with one line and its exit code: reach the
stack (start it with ``python -m infra.stack up`` when the default local one is down); start
the user's agent (``--agent-cmd``, its log kept beside the results) and wait until it registered
with LiveKit; send the batch (the file's scenarios inline, ``k`` trials each); follow it; wait
for the judge's ``BatchJudged`` (``judged.json``); write the report and JUnit; gate it
(cli/compare.py: absolute floors, a baseline when given, missing data never passes); print one
row per scenario. Exit 0 passed, 1 a scenario failed or regressed, 2 bad input, 3 crosstalk or
the stack could not run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from cli import (
    EXIT_BAD_INPUT,
    EXIT_BATCH_FAILED,
    EXIT_UNAVAILABLE,
    CliExit,
    compare,
    evaluate,
    report,
)
from cli.remote import connect, request_start, watch_batch
from cli.views import view_factory
from services.judge.store import BatchFiles
from shared import config, contracts

ROOT = Path(__file__).resolve().parents[1]
REGISTERED = b"registered worker"  # livekit-agents' INFO line once the worker is registered with LiveKit

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Mode(StrEnum):
    text = "text"
    voice = "voice"


# --------------------------------------------------------------------------- the stack


async def _reachable(settings: config.Settings) -> None:
    nc = await connect(settings)
    await nc.close()


def ensure_stack(settings: config.Settings, start: bool) -> None:
    """The stack answers, or is started here (only the default local one: NATS_URL unset); else exit 3."""
    try:
        asyncio.run(_reachable(settings))
        return
    except CliExit as exc:
        if not start or os.environ.get("NATS_URL"):
            raise CliExit(EXIT_UNAVAILABLE, f"{exc.message}; start the stack first (./ct up)") from None
    err.print("the stack is not running: starting it (python -m infra.stack up, as ./ct up does) ...", markup=False)
    res = subprocess.run([sys.executable, "-m", "infra.stack", "up"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip() or res.stdout.strip() or "no output").splitlines()[-1]
        raise CliExit(EXIT_UNAVAILABLE, f"the stack could not start: {last}")
    asyncio.run(_reachable(settings))


# --------------------------------------------------------------------------- the user's agent


@contextlib.contextmanager
def agent_process(cmd: str | None, settings: config.Settings, log_path: Path, ready_s: float) -> Iterator[None]:
    """Run ``cmd`` (the user's agent) against the stack's LiveKit while the batch runs; its log kept."""
    if not cmd:
        yield
        return
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise CliExit(EXIT_BAD_INPUT, f"--agent-cmd: {exc}") from None
    if not argv or shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
        raise CliExit(EXIT_BAD_INPUT, f"--agent-cmd: {argv[0] if argv else '(empty)'!r} is not a command")
    env = {**os.environ, "LIVEKIT_URL": settings.livekit_url, "LIVEKIT_API_KEY": settings.livekit_api_key,
           "LIVEKIT_API_SECRET": settings.livekit_api_secret}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_s
        while REGISTERED not in log_path.read_bytes():
            if proc.poll() is not None:
                raise CliExit(EXIT_UNAVAILABLE, f"your agent exited (code {proc.returncode}) before it registered "
                                                f"with LiveKit; its log: {log_path}")
            if time.monotonic() > deadline:
                err.print(f"warning: no '{REGISTERED.decode()}' line from your agent in {ready_s:g}s; going on "
                          f"(its log: {log_path})", markup=False)
                break
            time.sleep(0.2)
        err.print(f"your agent is running (pid {proc.pid}); its log: {log_path}", markup=False)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the verdict


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def verdict_table(data: dict[str, Any], result: compare.Comparison) -> Table:
    table = Table(title=f"verdict of {data['batch_id']}", title_justify="left")
    for col in ("scenario", "n", "passed", "pass rate (95% CI)", f"pass^{data['trials']}", "latency p50/p95",
                "failing criteria"):
        table.add_column(col)
    for s in data["scenarios"]:
        ci = f" ({_pct(s['ci_low'])}-{_pct(s['ci_high'])})" if s["ci_low"] is not None else ""
        pk = f"{s['pass_k']:.2f}" if s["pass_k"] is not None else (s.get("pass_k_note") or "-")
        lat = "-" if s["latency_p50_s"] is None else f"{s['latency_p50_s']:.2f}/{s['latency_p95_s']:.2f} s"
        reasons = s.get("failing_reasons") or {}
        failing = "; ".join(f"{name} x{n}: {reasons.get(name, '')[:120]}" for name, n in s["failing_criteria"].items())
        if s.get("not_judged"):
            failing = (failing + "; " if failing else "") + f"{s['not_judged']} not judged (no judge)"
        if s.get("infra_failures"):
            failing = (failing + "; " if failing else "") + f"{s['infra_failures']} infra: " + ", ".join(
                s.get("infra_reasons") or {})
        table.add_row(s["label"] or s["scenario_id"], str(s["n"]), str(s["passed"]), _pct(s["pass_rate"]) + ci, pk,
                      lat, failing or "-")
    return table


def _load_baseline(ref: str | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    try:
        return compare.load_report(Path(ref))
    except (OSError, ValueError) as exc:
        raise CliExit(EXIT_BAD_INPUT, f"--baseline: {ref}: {exc}") from None


def run_test(settings: config.Settings, *, agent_name: str, scenarios_file: Path, trials: int, mode: Mode,
             agent_cmd: str | None, th: compare.Thresholds, baseline: dict[str, Any] | None, junit: Path | None,
             as_json: bool, concurrency: int | None, max_turns: int | None, start: bool, timeout_s: float | None,
             judge_wait_s: float, agent_ready_s: float) -> int:
    try:
        entries = evaluate.inline_entries(scenarios_file)
        batch_id = f"test-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        body_fields = dict(batch_id=batch_id, conversations=len(entries) * trials, trials=trials, scenarios=entries,
                           target_agent=agent_name, mode=mode.value, concurrency=concurrency, max_turns=max_turns)
        body = msgspec.json.encode({k: v for k, v in body_fields.items() if v is not None})
        contracts.decode(body, contracts.StartBatch)
    except contracts.ContractError as exc:
        raise CliExit(EXIT_BAD_INPUT, f"{exc.field}: {exc.reason}") from None
    ensure_stack(settings, start)
    files = BatchFiles(settings.data_dir.resolve(), batch_id)
    with agent_process(agent_cmd, settings, files.dir / "agent.log", agent_ready_s):
        reply = asyncio.run(request_start(settings, body, 15.0))
        if not reply.accepted:
            raise CliExit(EXIT_BAD_INPUT, f"rejected: {reply.field or '$'}: {reply.reason or 'no reason given'}")
        err.print(f"batch {batch_id}: {len(entries)} scenario(s) x {trials} trial(s) against {agent_name!r} "
                  f"({mode.value})", markup=False)
        asyncio.run(watch_batch(settings, batch_id, wait_s=30.0, timeout_s=timeout_s,
                                view_factory=view_factory(err)))
    try:
        evaluate.wait_judged(files, judge_wait_s, partial=False)
    except typer.Exit as exc:
        raise CliExit(EXIT_UNAVAILABLE, "judging did not finish (see above)") from exc
    paths = report.write(files)
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["junit"], junit)
    data = report.build(files)
    result = compare.compare(baseline, data, th)
    code = 0 if result.passed else EXIT_BATCH_FAILED
    if as_json:
        print(json.dumps({"batch_id": batch_id, "passed": result.passed, "exit_code": code, "totals": data["totals"],
                          "scenarios": data["scenarios"], "violations": result.violations,
                          "report": {k: str(v) for k, v in paths.items()}, "junit": str(junit or paths["junit"])},
                         ensure_ascii=False, indent=2))
    else:
        out.print(verdict_table(data, result))
        for v in result.violations:
            out.print(f"FAIL {v}", markup=False)
        out.print(f"{'PASSED' if result.passed else 'FAILED'}: report {paths['html']}, JUnit {junit or paths['junit']}",
                  markup=False)
    return code


def test_cmd(
    agent_name: Annotated[str, typer.Option("--agent-name", "--target-agent", help="Your agent's registered agent name.",
                                            show_default=False)],
    scenarios_file: Annotated[Path, typer.Option("--scenarios", "--scenarios-file", help="A local LiveKit scenarios.yaml.",
                                                 show_default=False)],
    trials: Annotated[int, typer.Option("-k", "--trials", min=1, max=100, help="Runs of each scenario (pass^k).")] = 1,
    mode: Annotated[Mode, typer.Option("--mode", help="Talk by text or by voice.")] = Mode.text,
    agent_cmd: Annotated[str | None, typer.Option(
        "--agent-cmd", help="Start your agent with this command for the run (stopped after; log kept).")] = None,
    min_pass_rate: Annotated[float, typer.Option(help="Lowest pass rate per scenario (0..1).")] = 1.0,
    min_pass_k: Annotated[float | None, typer.Option(help="Lowest pass^k per scenario (0..1).")] = None,
    max_infra_rate: Annotated[float, typer.Option(help="Highest share lost to crosstalk's own faults.")] = 0.1,
    allow_not_judged: Annotated[bool, typer.Option("--allow-not-judged", help="Pass without an LLM judge.")] = False,
    baseline: Annotated[str | None, typer.Option("--baseline", help="A report.json to gate regressions against.")
                        ] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write the JUnit XML here too.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
    concurrency: Annotated[int | None, typer.Option("-c", "--concurrency", min=1, help="Calls at once.")] = None,
    max_turns: Annotated[int | None, typer.Option("--max-turns", min=1, help="Hard cap on turns per call.")] = None,
    start: Annotated[bool, typer.Option("--start/--no-start", help="Start the local stack if it is down.")] = True,
    timeout: Annotated[float | None, typer.Option("--timeout", min=1, help="Give up on the batch after this (s).")
                       ] = None,
    judge_wait: Annotated[float, typer.Option("--judge-wait", min=0, help="Seconds to wait for judging.")] = 300.0,
    agent_ready: Annotated[float, typer.Option("--agent-ready", min=0, help="Seconds for your agent to register.")
                           ] = 90.0,
) -> None:
    """Test your agent on a scenarios file: pass/fail per scenario, report, JUnit, CI exit code."""
    try:
        settings = config.load()
        th = compare.load_thresholds(None, {"min_pass_rate": min_pass_rate, "min_pass_k": min_pass_k,
                                            "max_infra_rate": max_infra_rate, "allow_not_judged": allow_not_judged})
    except config.ConfigError as exc:
        raise _exit(EXIT_BAD_INPUT, f"configuration: {exc.var}: {exc.reason}") from None
    except ValueError as exc:
        raise _exit(EXIT_BAD_INPUT, str(exc)) from None
    try:
        code = run_test(settings, agent_name=agent_name, scenarios_file=scenarios_file, trials=trials, mode=mode,
                        agent_cmd=agent_cmd, th=th, baseline=_load_baseline(baseline), junit=junit, as_json=as_json,
                        concurrency=concurrency, max_turns=max_turns, start=start, timeout_s=timeout,
                        judge_wait_s=judge_wait, agent_ready_s=agent_ready)
    except CliExit as exc:
        raise _exit(exc.code, exc.message) from None
    raise typer.Exit(code)


def _exit(code: int, message: str) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)
