"""The typer commands of ``crosstalk``: thin wiring of config, ``remote`` (NATS), ``progress`` and ``views``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from cli import (
    EXIT_BAD_INPUT,
    EXIT_BATCH_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    CliExit,
    batches,
    config_cmd,
    evaluate,
    export,
    testcmd,
)
from cli.progress import AUDIT_LABELS, audit_counts, format_duration, summary_lines
from cli.remote import request_start, watch_batch
from cli.views import view_factory
from shared import config, contracts, scenarios, subjects
from shared.contracts import BatchReply, ContractError, StartBatch

REQUEST_TIMEOUT_S = 15.0

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="crosstalk",
    help="Test your LiveKit agent against simulated callers, and run batches of agent-to-agent conversations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP,
)
batch_app = typer.Typer(help="Start, follow and inspect batches.", no_args_is_help=True, context_settings=HELP)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"crosstalk {version('crosstalk')}", markup=False)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Test your LiveKit agent against simulated callers, and run batches of agent-to-agent conversations."""
app.add_typer(batch_app, name="batch")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def start_body(**fields: Any) -> bytes:
    """The ``batch.start`` JSON with only the options given; validated against the contract."""
    given = {k: v for k, v in fields.items() if v is not None}
    body = msgspec.json.encode(given)
    contracts.decode(body, StartBatch)  # raises ContractError naming the field
    return body


def results_dir(settings: config.Settings, batch_id: str) -> Path:
    """``<data_dir>/batches/<batch_id>/``; the id must already be valid."""
    if not contracts.is_id(batch_id):
        raise CliExit(EXIT_BAD_INPUT, f"batch_id: {batch_id!r} must match [a-z0-9][a-z0-9-]{{0,63}}")
    return (settings.data_dir / "batches" / batch_id).resolve()


def _settings() -> config.Settings:
    try:
        return config.load()
    except config.ConfigError as exc:
        err.print(f"error: configuration: {exc.var}: {exc.reason}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _run(coro_fn: Callable[[], Any]) -> Any:
    try:
        return asyncio.run(coro_fn())
    except CliExit as exc:
        err.print(f"error: {exc.message}", markup=False)
        raise typer.Exit(exc.code) from None


def _follow(settings: config.Settings, batch_id: str, wait_s: float, timeout_s: float | None) -> None:
    results = results_dir(settings, batch_id)
    try:
        progress = _run(lambda: watch_batch(
            settings, batch_id, wait_s=wait_s, timeout_s=timeout_s, view_factory=view_factory(err)))
    except KeyboardInterrupt:
        err.print(f"stopped watching; the batch keeps running. Resume with: crosstalk batch watch {batch_id}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for line in summary_lines(progress, results, time.time()):
        out.print(line, markup=False)
    if progress.ignored:
        err.print(f"note: {progress.ignored} event(s) of a kind this CLI does not know were skipped")
    assert progress.finished is not None
    if progress.finished.status != "completed":
        raise typer.Exit(EXIT_BATCH_FAILED)


WaitOpt = Annotated[
    float, typer.Option("--wait", min=0.0, help="Seconds to wait for the batch's first event before giving up.")
]
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", min=0.0, help="Stop watching after this many seconds (exit 3).")
]


@batch_app.command("start")
def batch_start(
    conversations: Annotated[int | None, typer.Option("-n", "--conversations", help="Conversations in the batch.")] = None,
    concurrency: Annotated[int | None, typer.Option("-c", "--concurrency", help="Conversations in flight at once.")] = None,
    scenario: Annotated[str | None, typer.Option("--scenario", help="Scenario id (see `crosstalk scenarios`).")] = None,
    language: Annotated[str | None, typer.Option("--language", help="Language, e.g. en, hi.")] = None,
    max_turns: Annotated[int | None, typer.Option("--max-turns", help="Hard cap on turns per conversation.")] = None,
    mode: Annotated[testcmd.Mode | None, typer.Option("--mode", help="Talk by text or by voice.")] = None,
    scenarios_path: Annotated[str | None, typer.Option(
        "--scenarios", help="A scenarios.yaml on the dispatcher, relative to its CROSSTALK_SCENARIO_DIR.")] = None,
    scenarios_file: Annotated[Path | None, typer.Option(
        "--scenarios-file", help="A local scenarios.yaml, sent inline.")] = None,
    trials: Annotated[int | None, typer.Option("--trials", "-k", help="Runs of each scenario (pass^k).")] = None,
    batch_id: Annotated[str | None, typer.Option("--batch-id", help="Batch id; repeating one is idempotent.")] = None,
    target_agent: Annotated[str | None, typer.Option(
        "--agent-name", "--target-agent",
        help="Your own agent's name: crosstalk's customer calls it (it takes the support role).")] = None,
    target_metadata: Annotated[str | None, typer.Option(
        "--target-metadata", help="Dispatch metadata handed to your agent (with --target-agent).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then watch the batch until it finishes.")] = False,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", min=0.1, help="Seconds to wait for the dispatcher's verdict.")
    ] = REQUEST_TIMEOUT_S,
    wait: WaitOpt = 30.0,
    timeout: TimeoutOpt = None,
) -> None:
    """Send a batch.start request and print the verdict; --follow then watches the batch."""
    settings = _settings()
    try:
        inline = evaluate.inline_entries(scenarios_file) if scenarios_file is not None else None
        body = start_body(
            batch_id=batch_id, conversations=conversations, concurrency=concurrency, scenario=scenario,
            language=language, max_turns=max_turns, mode=mode.value if mode else None, trials=trials,
            scenarios=inline if inline is not None else scenarios_path,
            target_agent=target_agent, target_metadata=target_metadata,
        )
    except ContractError as exc:
        err.print(f"rejected: {exc.field}: {exc.reason}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    send_start(settings, body, follow=follow, request_timeout=request_timeout, wait=wait, timeout=timeout)


def send_start(settings: config.Settings, body: bytes, *, follow: bool, request_timeout: float = REQUEST_TIMEOUT_S,
               wait: float = 30.0, timeout: float | None = None) -> None:
    """Send a validated ``batch.start`` body, print the verdict, and with ``follow`` watch the batch.

    Failures raise ``typer.Exit`` with the exit code. ``just batch`` (infra/stack) calls this too.
    """
    reply: BatchReply = _run(lambda: request_start(settings, body, request_timeout))
    if not reply.accepted:
        err.print(f"rejected: {reply.field or '$'}: {reply.reason or 'no reason given'}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    accepted_id = reply.batch_id or msgspec.json.decode(body).get("batch_id")
    if not accepted_id or not contracts.is_id(accepted_id):
        err.print(f"error: the dispatcher accepted the batch but replied with batch_id {accepted_id!r}")
        raise typer.Exit(EXIT_UNAVAILABLE)
    word = "already accepted (same id, nothing new started)" if reply.duplicate else "accepted"
    out.print(f"batch {accepted_id} {word}", markup=False)
    if follow:
        _follow(settings, accepted_id, wait, timeout)
    else:
        out.print(f"follow it with: crosstalk batch watch {accepted_id}", markup=False)


@batch_app.command("watch")
def batch_watch(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    wait: WaitOpt = 30.0,
    timeout: TimeoutOpt = None,
) -> None:
    """Show a batch's progress from its events (past and live) and a summary when it ends."""
    settings = _settings()
    try:
        subjects.batch_events(batch_id)
    except ContractError as exc:
        err.print(f"error: {exc.field}: {batch_id!r} {exc.reason}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    _follow(settings, batch_id, wait, timeout)


def _when(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return "-" if value is None else str(value)


@batch_app.command("show")
def batch_show(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print batch.json as it is.")] = False,
) -> None:
    """Print a batch's summary from <data_dir>/batches/<id>/batch.json."""
    settings = _settings()
    try:
        folder = results_dir(settings, batch_id)
    except CliExit as exc:
        err.print(f"error: {exc.message}", markup=False)
        raise typer.Exit(exc.code) from None
    path = folder / "batch.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        err.print(f"error: no batch.json at {path} (CROSSTALK_DATA_DIR is {settings.data_dir})", markup=False)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        err.print(f"error: {path}: {exc}", markup=False)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    if as_json:
        out.print(raw.decode("utf-8"), markup=False, end="" if raw.endswith(b"\n") else "\n")
        return
    table = Table(title=f"batch {batch_id}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    first = ("batch_id", "status", "requested", "completed", "failed", "started_at", "finished_at")
    for key in first:
        value = doc.get(key)
        table.add_row(key, _when(value) if key.endswith("_at") else ("-" if value is None else str(value)))
    started, finished = doc.get("started_at"), doc.get("finished_at")
    if isinstance(started, int | float) and isinstance(finished, int | float):
        table.add_row("wall time", format_duration(finished - started))
    for key, value in doc.items():
        if key in first:
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if not isinstance(v, dict | list):
                    table.add_row(f"{key}.{sub}", str(v))
        elif not isinstance(value, list):
            table.add_row(key, _when(value) if key.endswith("_at") else str(value))
    counts = audit_counts(doc)
    for kind, label in AUDIT_LABELS.items():
        table.add_row(label, str(counts[kind]))
    table.add_row("rooms audit: conversations no webhook reported", str(counts["unaudited"]))
    convs = folder / "conversations"
    files = sorted(convs.glob("*.jsonl")) if convs.is_dir() else []
    table.add_row("transcripts", f"{len(files)} file(s) in {convs}")
    recs = folder / "recordings"
    if recs.is_dir():  # voice mode; voice.* above has its metrics and, for speaker-text hearing, a note
        table.add_row("recordings", f"{len(list(recs.glob('*.wav')))} file(s) in {recs}")
    out.print(table)


scenarios_app = typer.Typer(help="List the scenario library; `validate FILE` checks scenario files.",
                            invoke_without_command=True, context_settings=HELP)
app.add_typer(scenarios_app, name="scenarios")


@scenarios_app.callback()
def list_scenarios(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
                   ) -> None:
    """List the scenario library (built-in plus CROSSTALK_SCENARIO_DIR)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        library = scenarios.library()
    except (OSError, ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        err.print(f"error: scenario library: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        print(json.dumps([{"id": sid, "language": sc.language, "title": sc.title, "turns": len(sc.script),
                           "default": sid == scenarios.DEFAULT_SCENARIO} for sid, sc in sorted(library.items())],
                         ensure_ascii=False, indent=2))
        return
    table = Table()
    # Ids are what users type: never truncate or wrap them, even on a narrow CI log.
    table.add_column("id", no_wrap=True, min_width=max((len(s) for s in library), default=2) + len(" (default)"))
    table.add_column("language", no_wrap=True)
    table.add_column("title", overflow="fold")
    for col in ("customer", "support", "turns"):
        table.add_column(col)
    for sid, sc in sorted(library.items()):
        name = f"{sid} (default)" if sid == scenarios.DEFAULT_SCENARIO else sid
        table.add_row(name, sc.language, sc.title, sc.roles["customer"].name, sc.roles["support"].name,
                      str(len(sc.script)))
    out.print(table)


evaluate.register(app, scenarios_app)
batches.register(batch_app)  # batch cancel, batch list (cli/batches.py)
config_cmd.register(app)  # config show (cli/config_cmd.py)
app.command("test")(testcmd.test_cmd)
app.command("export")(export.export_cmd)

if __name__ == "__main__":  # pragma: no cover
    app()
