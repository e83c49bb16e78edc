"""``crosstalk batch cancel`` and ``crosstalk batch list``: stop a batch; see the batches the data dir holds.

``cancel`` sends ``batch.cancel`` and prints the dispatcher's verdict (docs/ARCHITECTURE.md
"batch.cancel"): no new conversation of the batch starts, the running ones finish, and the batch
ends ``cancelled``. ``list`` reads ``<data_dir>/batches/*/batch.json`` (the sink's files), newest
first. Both take ``--json``. Registered on ``crosstalk batch`` by :func:`register` (cli/app.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console

from cli import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, CliExit
from cli.remote import connect
from shared import bus, config, contracts, streams, subjects
from shared.contracts import BatchReply, CancelBatch, ContractError

REQUEST_TIMEOUT_S = 15.0
# What `batch list` shows of each batch.json, in this order (its --json objects carry these keys).
LISTED = ("batch_id", "status", "requested", "completed", "failed", "cancelled", "started_at", "finished_at",
          "mode", "target_agent")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _fail(code: int, message: str) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def _settings() -> config.Settings:
    try:
        return config.load()
    except config.ConfigError as exc:
        raise _fail(EXIT_BAD_INPUT, f"configuration: {exc.var}: {exc.reason}") from None


# --------------------------------------------------------------------------- cancel


async def request_cancel(settings: config.Settings, body: bytes, timeout: float) -> BatchReply:
    """Send ``batch.cancel`` and wait for the dispatcher's verdict (the stream keeps the command meanwhile)."""
    nc = await connect(settings)
    try:
        await streams.ensure_streams(nc.jetstream(timeout=10))  # so a cancel sent while no dispatcher runs is kept
        try:
            return contracts.decode((await nc.request(subjects.BATCH_CANCEL, body, timeout=timeout)).data, BatchReply)
        except bus.NO_ANSWER:
            raise CliExit(EXIT_UNAVAILABLE, f"no verdict from a dispatcher within {timeout:g}s; the cancel is "
                                            f"stored in {streams.BATCH_CMDS.name} and runs when one starts") from None
        except ContractError as exc:
            raise CliExit(EXIT_UNAVAILABLE, f"unexpected reply on batch.cancel: {exc}") from None
    finally:
        await nc.close()


def batch_cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    as_json: JsonOpt = False,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", min=0.1, help="Seconds to wait for the dispatcher's verdict.")
    ] = REQUEST_TIMEOUT_S,
) -> None:
    """Cancel a batch: no new conversation starts, the running ones finish, it ends `cancelled`."""
    import asyncio

    try:
        body = msgspec.json.encode(contracts.decode(msgspec.json.encode({"batch_id": batch_id}), CancelBatch))
    except ContractError as exc:
        raise _fail(EXIT_BAD_INPUT, f"{exc.field}: {batch_id!r} {exc.reason}") from None
    settings = _settings()
    try:
        reply = asyncio.run(request_cancel(settings, body, request_timeout))
    except CliExit as exc:
        raise _fail(exc.code, exc.message) from None
    if as_json:
        out.print(contracts.encode(reply).decode(), markup=False)
    elif reply.accepted:
        word = "was already cancelled" if reply.duplicate else "cancelled: no new conversation starts"
        out.print(f"batch {batch_id} {word}; the running ones finish. Watch it end: crosstalk batch watch {batch_id}",
                  markup=False)
    else:
        err.print(f"rejected: {reply.field or '$'}: {reply.reason or 'no reason given'}", markup=False)
    if not reply.accepted:
        raise typer.Exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------- list


def batch_docs(data_dir: Path) -> Iterator[dict[str, Any]]:
    """The ``LISTED`` fields of every readable ``batches/*/batch.json`` under ``data_dir``, newest first."""
    found = []
    for path in (data_dir / "batches").glob("*/batch.json"):
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and contracts.is_id(str(doc.get("batch_id"))):
            found.append({k: doc.get(k) for k in LISTED})
    yield from sorted(found, key=lambda d: (_number(d["started_at"]), d["batch_id"]), reverse=True)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _when(value: Any) -> str:
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M") if _number(value) else "-"


def batch_list(as_json: JsonOpt = False) -> None:
    """List the batches in the data directory (their batch.json), newest first."""
    settings = _settings()
    docs = list(batch_docs(settings.data_dir))
    if as_json:
        out.print(json.dumps(docs, ensure_ascii=False), markup=False)
        return
    if not docs:
        err.print(f"no batches in {settings.data_dir / 'batches'} (CROSSTALK_DATA_DIR)", markup=False)
        return
    # plain aligned columns (as `docker ps`): a table squeezed into a narrow terminal or a CI log would fold
    rows = [[h.upper() for h in ("id", "status", *LISTED[2:6], "started", "finished", "mode", "target")]]
    rows += [[d["batch_id"], str(d["status"]), *(str(d[k] if d[k] is not None else "-") for k in LISTED[2:6]),
              _when(d["started_at"]), _when(d["finished_at"]), str(d["mode"] or "-"), str(d["target_agent"] or "-")]
             for d in docs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip(), markup=False)


def register(batch_app: typer.Typer) -> None:
    """``crosstalk batch cancel`` and ``crosstalk batch list``."""
    batch_app.command("cancel")(batch_cancel)
    batch_app.command("list")(batch_list)
