"""The ``crosstalk`` command: start a batch, follow it live, show its results, list scenarios.

    crosstalk batch start -n 200 -c 50 --scenario hi-account-help --follow
    crosstalk batch watch <batch_id>
    crosstalk batch show <batch_id>
    crosstalk scenarios

``batch start`` sends a ``batch.start`` request (core NATS) and prints the
dispatcher's verdict. ``batch watch`` replays the batch's events from the
BATCH_EVENTS stream (JetStream ordered consumer, deliver all) and then follows
them live: a progress bar on a terminal, a status line every few seconds
elsewhere (CI), and a summary at the end.

The tally of events (:class:`BatchProgress`) and the summary text are pure and
have no NATS in them; the commands at the bottom are the thin wiring.

Exit codes: 0 done, 1 the batch failed, 2 bad input (invalid id or option,
rejected command, bad configuration), 3 unavailable (NATS unreachable, no
verdict, no such batch, timed out), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
)
from rich.table import Table

from shared import config, contracts, scenarios, streams, subjects
from shared.contracts import (
    BatchAccepted,
    BatchEvent,
    BatchFinished,
    BatchReply,
    ContractError,
    ConversationDispatched,
    ConversationSettled,
    DispatcherStatus,
    StartBatch,
)

EXIT_OK = 0
EXIT_BATCH_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

REQUEST_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
STATUS_EVERY_S = 5.0  # non-terminal output: one status line at most this often

app = typer.Typer(
    name="crosstalk",
    help="Run and follow batches of agent-to-agent conversations on LiveKit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
batch_app = typer.Typer(help="Start, follow and inspect batches.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliExit(Exception):
    """Stop with ``code`` after printing ``message`` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- pure: progress


def reason_head(reason: str) -> str:
    """``"join_timeout: no agent after 60s"`` -> ``"join_timeout"`` (for tallies)."""
    return reason.split(":", 1)[0].strip() or "unknown"


@dataclass
class BatchProgress:
    """The watcher's tally of one batch: apply its events in stream order.

    Keyed by (conversation, attempt), so a redelivered event counts once and a
    retried conversation is in flight again until its next attempt settles.
    """

    batch_id: str
    requested: int | None = None
    started_at: float | None = None
    last_at: float | None = None
    finished: BatchFinished | None = None
    ignored: int = 0
    # From the dispatcher's live ``dispatcher.status`` (not in the batch log): conversations waiting
    # for worker capacity, and the live workers' free/total agent sessions. None until one arrives.
    queued: int | None = None
    free_sessions: int | None = None
    capacity_sessions: int | None = None
    _dispatched: set[tuple[str, int]] = field(default_factory=set)
    _settled: set[tuple[str, int]] = field(default_factory=set)
    _completed: set[str] = field(default_factory=set)
    _failed: dict[str, str] = field(default_factory=dict)

    def apply(self, event: Any) -> None:
        at = getattr(event, "at", None) or getattr(event, "finished_at", None)
        if isinstance(at, int | float):
            self.last_at = max(self.last_at or at, at)
        if isinstance(event, BatchAccepted):
            self.requested = event.spec.conversations
            self.started_at = event.at
        elif isinstance(event, ConversationDispatched):
            self._dispatched.add((event.conversation_id, event.attempt))
        elif isinstance(event, ConversationSettled):
            key = (event.conversation_id, event.attempt)
            self._dispatched.add(key)
            self._settled.add(key)
            if event.outcome == "completed":
                self._completed.add(event.conversation_id)
                self._failed.pop(event.conversation_id, None)
            elif not event.retry and event.conversation_id not in self._completed:
                self._failed[event.conversation_id] = event.reason
        elif isinstance(event, BatchFinished):
            self.finished = event
            self.requested = event.requested
            self.started_at = self.started_at or event.started_at

    def apply_status(self, status: DispatcherStatus) -> None:
        mine = status.batches.get(self.batch_id)
        self.queued = mine.queued if mine is not None else 0
        self.free_sessions, self.capacity_sessions = status.free, status.capacity

    @property
    def waiting(self) -> str:
        """``", 8 queued for worker capacity (0 of 16 sessions free)"`` while conversations wait, else ""."""
        if self.finished or not self.queued:
            return ""
        return (f", {self.queued} queued for worker capacity "
                f"({self.free_sessions} of {self.capacity_sessions} sessions free)")

    @property
    def completed(self) -> int:
        return self.finished.completed if self.finished else len(self._completed)

    @property
    def failed(self) -> int:
        return self.finished.failed if self.finished else len(self._failed)

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def in_flight(self) -> int:
        return 0 if self.finished else len(self._dispatched - self._settled)

    @property
    def failure_reasons(self) -> Counter[str]:
        return Counter(reason_head(r) for r in self._failed.values())

    def elapsed(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished.finished_at if self.finished else now
        return max(end - self.started_at, 0.0)

    def rate_per_min(self, now: float) -> float:
        """Settled conversations per minute since the batch started."""
        elapsed = self.elapsed(now)
        if not elapsed or elapsed <= 0:
            return 0.0
        return self.done / elapsed * 60.0


def format_duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def status_line(p: BatchProgress, now: float) -> str:
    total = p.requested if p.requested is not None else "?"
    return (
        f"batch {p.batch_id}: {p.done}/{total} settled ({p.completed} completed, {p.failed} failed), "
        f"{p.in_flight} in flight{p.waiting}, {p.rate_per_min(now):.1f} conv/min"
    )


def summary_lines(p: BatchProgress, results: Path, now: float) -> list[str]:
    status = p.finished.status if p.finished else "running"
    total = p.requested if p.requested is not None else "?"
    lines = [
        f"batch {p.batch_id} {status}",
        f"  conversations: {p.completed} completed, {p.failed} failed, of {total}",
    ]
    reasons = p.failure_reasons
    if reasons:
        tally = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"  failures: {tally}")
    elapsed = p.elapsed(now)
    if elapsed is not None:
        lines.append(f"  wall time: {format_duration(elapsed)}, {p.rate_per_min(now):.1f} conv/min")
    lines.append(f"  results: {results}/")
    return lines


def results_dir(settings: config.Settings, batch_id: str) -> Path:
    """``<data_dir>/batches/<batch_id>/``; the id must already be valid."""
    if not contracts.is_id(batch_id):
        raise CliExit(EXIT_BAD_INPUT, f"batch_id: {batch_id!r} must match [a-z0-9][a-z0-9-]{{0,63}}")
    return (settings.data_dir / "batches" / batch_id).resolve()


def redact_url(url: str) -> str:
    """A NATS URL without credentials, fit for a message."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def start_body(**fields: Any) -> bytes:
    """The ``batch.start`` JSON with only the options given; validated against the contract."""
    given = {k: v for k, v in fields.items() if v is not None}
    body = msgspec.json.encode(given)
    contracts.decode(body, StartBatch)  # raises ContractError naming the field
    return body


# --------------------------------------------------------------------------- wiring: NATS


def _settings() -> config.Settings:
    try:
        return config.load()
    except config.ConfigError as exc:
        err.print(f"error: configuration: {exc.var}: {exc.reason}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


async def _connect(settings: config.Settings) -> Any:
    """Connect within CONNECT_TIMEOUT_S; once up, reconnect as long as the watch lasts."""
    import nats

    errors: list[BaseException] = []

    async def on_error(exc: BaseException) -> None:
        errors.append(exc)  # reported below if we never connect; never printed with the URL

    try:
        return await asyncio.wait_for(
            nats.connect(
                settings.nats_url, name="crosstalk-cli", connect_timeout=2, allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=on_error,
            ),
            CONNECT_TIMEOUT_S,
        )
    except Exception as exc:  # timed out, refused, bad credentials: all mean "not reachable"
        cause = errors[-1] if errors else exc
        raise CliExit(
            EXIT_UNAVAILABLE,
            f"cannot reach NATS at {redact_url(settings.nats_url)} (NATS_URL) within {CONNECT_TIMEOUT_S:g}s: "
            f"{type(cause).__name__}",
        ) from None


async def request_start(settings: config.Settings, body: bytes, timeout: float) -> BatchReply:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError

    nc = await _connect(settings)
    try:
        # The stream captures batch.start, so a command sent before any dispatcher runs is kept.
        await streams.ensure_streams(nc.jetstream(timeout=10))
        try:
            msg = await nc.request(subjects.BATCH_START, body, timeout=timeout)
        except (TimeoutError, NatsTimeoutError):
            raise CliExit(
                EXIT_UNAVAILABLE,
                f"no verdict from a dispatcher within {timeout:g}s. The command is stored in the "
                f"{streams.BATCH_CMDS.name} stream and runs when a dispatcher starts (`just up`, `just status`).",
            ) from None
        except NoRespondersError:
            raise CliExit(EXIT_UNAVAILABLE, "nothing answers batch.start: is the dispatcher running?") from None
        try:
            return contracts.decode(msg.data, BatchReply)
        except ContractError as exc:
            raise CliExit(EXIT_UNAVAILABLE, f"unexpected reply on batch.start: {exc}") from None
    finally:
        await nc.close()


class LiveView:
    """A rich progress bar for a terminal."""

    def __init__(self, console: Console, batch_id: str) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[ok]} completed[/] [red]{task.fields[failed]} failed[/] "
                "[cyan]{task.fields[in_flight]} in flight[/][yellow]{task.fields[queued]}[/] "
                "{task.fields[rate]:.1f} conv/min "
                "{task.fields[elapsed]}"
            ),
            console=console,
            transient=False,
        )
        self.task: TaskID = self.progress.add_task(
            f"batch {batch_id}", total=None, ok=0, failed=0, in_flight=0, queued="", rate=0.0, elapsed="")
        self.progress.start()

    def update(self, p: BatchProgress, now: float, caught_up: bool) -> None:
        self.progress.update(
            self.task, total=p.requested, completed=p.done, ok=p.completed, failed=p.failed,
            in_flight=p.in_flight, queued=p.waiting, rate=p.rate_per_min(now),
            elapsed=format_duration(elapsed) if (elapsed := p.elapsed(now)) is not None else "",
        )

    def close(self) -> None:
        self.progress.stop()


class LineView:
    """Plain status lines for logs and CI: after the replay, then every few seconds."""

    def __init__(self, console: Console, batch_id: str) -> None:
        self.console = console
        self.last = -math.inf
        self.last_text = ""
        self.was_caught_up = False

    def update(self, p: BatchProgress, now: float, caught_up: bool) -> None:
        due = time.monotonic() - self.last >= STATUS_EVERY_S
        if (caught_up and not self.was_caught_up) or (caught_up and due):
            text = status_line(p, now)
            if text != self.last_text:
                self.console.print(text)
                self.last_text = text
            self.last = time.monotonic()
        self.was_caught_up = caught_up

    def close(self) -> None:
        pass


async def watch_batch(
    settings: config.Settings,
    batch_id: str,
    *,
    wait_s: float,
    timeout_s: float | None,
    view_factory: Callable[[str], LiveView | LineView],
    clock: Callable[[], float] = time.time,
) -> BatchProgress:
    """Replay then follow ``batch.evt.<batch_id>`` until BatchFinished."""
    from nats.js.api import DeliverPolicy
    from nats.js.errors import NotFoundError

    subject = subjects.batch_events(batch_id)  # validates the id
    progress = BatchProgress(batch_id)
    nc = await _connect(settings)
    view = None
    try:
        js = nc.jetstream(timeout=10)

        async def on_status(msg: Any) -> None:
            try:
                progress.apply_status(contracts.decode(msg.data, DispatcherStatus))
            except ContractError:
                pass

        await nc.subscribe(subjects.DISPATCHER_STATUS, cb=on_status)
        try:
            sub = await js.subscribe(
                subject, stream=streams.BATCH_EVENTS.name, ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL, idle_heartbeat=2.0,
            )
        except NotFoundError:
            raise CliExit(
                EXIT_UNAVAILABLE,
                f"stream {streams.BATCH_EVENTS.name} not found on {redact_url(settings.nats_url)}: "
                "has a dispatcher ever run there?",
            ) from None
        view = view_factory(batch_id)
        started = time.monotonic()
        seen_any = False
        while progress.finished is None:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise CliExit(EXIT_UNAVAILABLE, f"gave up after {timeout_s:g}s; {status_line(progress, clock())}")
            limit = 1.0 if seen_any else max(0.05, min(1.0, wait_s))
            try:
                msg = await sub.next_msg(timeout=limit)
            except TimeoutError:  # nats.errors.TimeoutError is a TimeoutError too
                if not seen_any and time.monotonic() - started >= wait_s:
                    raise CliExit(
                        EXIT_UNAVAILABLE,
                        f"no events for batch {batch_id} within {wait_s:g}s: unknown batch id, "
                        "or no dispatcher has taken it yet",
                    ) from None
                view.update(progress, clock(), caught_up=seen_any)
                continue
            seen_any = True
            try:
                progress.apply(contracts.decode_event(msg.data, BatchEvent))
            except ContractError:
                progress.ignored += 1  # an event kind this CLI does not know yet
            pending = msg.metadata.num_pending if msg.metadata else 0
            view.update(progress, clock(), caught_up=pending == 0)
        view.update(progress, clock(), caught_up=True)
        return progress
    finally:
        if view is not None:
            view.close()
        await nc.close()


def _view_factory(console: Console) -> Callable[[str], LiveView | LineView]:
    def make(batch_id: str) -> LiveView | LineView:
        return LiveView(console, batch_id) if console.is_terminal else LineView(console, batch_id)

    return make


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
            settings, batch_id, wait_s=wait_s, timeout_s=timeout_s, view_factory=_view_factory(err)))
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


# --------------------------------------------------------------------------- commands

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
    mode: Annotated[str | None, typer.Option("--mode", help="text or voice.")] = None,
    batch_id: Annotated[str | None, typer.Option("--batch-id", help="Batch id; repeating one is idempotent.")] = None,
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
        body = start_body(
            batch_id=batch_id, conversations=conversations, concurrency=concurrency, scenario=scenario,
            language=language, max_turns=max_turns, mode=mode,
        )
    except ContractError as exc:
        err.print(f"rejected: {exc.field}: {exc.reason}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    reply: BatchReply = _run(lambda: request_start(settings, body, request_timeout))
    if not reply.accepted:
        err.print(f"rejected: {reply.field or '$'}: {reply.reason or 'no reason given'}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    accepted_id = reply.batch_id or batch_id
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


# The room audit's violations (batch.json, per conversation; services/sink/audit.py), as shown.
AUDIT_LABELS = {
    "two_of_one_role": "rooms audit: two of one role",
    "no_grant": "rooms audit: participant without a grant",
    "third_agent": "rooms audit: third agent",
}


def audit_counts(doc: dict[str, Any]) -> dict[str, int]:
    """Violations by kind over every conversation of a batch.json, and ``unaudited``: conversations
    that were dispatched but that livekit-server's webhooks never reported a participant of."""
    counts = dict.fromkeys(AUDIT_LABELS, 0)
    counts["unaudited"] = 0
    convs = doc.get("conversations")
    for entry in (convs.values() if isinstance(convs, dict) else ()):
        if not isinstance(entry, dict):
            continue
        for v in entry.get("violations") or ():
            if isinstance(v, dict) and v.get("kind") in counts:
                counts[v["kind"]] += 1
        if (entry.get("attempts") or 0) > 0 and not entry.get("participants"):
            counts["unaudited"] += 1
    return counts


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
    out.print(table)


@app.command("scenarios")
def list_scenarios() -> None:
    """List the scenario library (built-in plus CROSSTALK_SCENARIO_DIR)."""
    try:
        library = scenarios.library()
    except (OSError, ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        err.print(f"error: scenario library: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
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


if __name__ == "__main__":  # pragma: no cover
    app()
