"""``crosstalk export``: a batch as a dataset, one record per conversation.

    crosstalk export <batch_id> --format jsonl|parquet [--out FILE]

A record: ``batch_id``, ``conversation_id``, ``scenario_id``, ``label``, ``trial``, ``language``,
``mode``, ``persona`` (the customer's name, persona and goal), ``outcome`` and ``reason`` (from
batch.json), ``verdict`` and ``status`` (from the judgment, when judged), ``turns`` (each with
``turn``, ``role``, ``text``, ``started_at``, ``ended_at``, ``first_token_s`` and, in voice mode,
``audio_start_s``, ``audio_end_s``, ``heard_text``), and ``recording`` (the WAV's path relative
to the batch folder, or null). The same schema in both formats, so Hugging Face ``datasets``
loads either as is (``load_dataset("json", ...)`` / ``("parquet", ...)``). Parquet is written
with pyarrow (the reference implementation, and what ``datasets`` itself reads with). UTF-8 as
is: Devanagari in, the same bytes out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import EXIT_BAD_INPUT, evaluate
from services.judge.batch import legacy_spec, scenario_of
from services.judge.store import BatchFiles
from shared import scenarios

TURN_FIELDS = ("turn", "role", "text", "started_at", "ended_at", "first_token_s", "audio_start_s", "audio_end_s",
               "heard_text")


class Format(StrEnum):
    jsonl = "jsonl"
    parquet = "parquet"


def _turns(files: BatchFiles, cid: str) -> list[dict[str, Any]]:
    return [{k: t.get(k) for k in TURN_FIELDS} for t in files.turn_lines(cid)]


def records(files: BatchFiles) -> Iterator[dict[str, Any]]:
    """One record per conversation of the batch, in order."""
    doc = files.batch_doc() or {}
    spec = files.plan() or legacy_spec(files.batch_id, doc)
    entries = doc.get("conversations") or {}
    library = scenarios.library()
    for index in range(spec.conversations):
        cid = f"{spec.batch_id}-{index:05d}"
        entry = entries.get(cid, {})
        scenario, trial = scenario_of(spec, index, library)
        judgment = files.judgment(cid)
        rec = files.recording(cid)
        customer = scenario.roles.get("customer") if scenario else None
        yield {
            "batch_id": spec.batch_id, "conversation_id": cid,
            "scenario_id": scenario.id if scenario else None, "label": scenario.display_label if scenario else None,
            "trial": trial, "language": (spec.language if spec.language not in ("", "mixed") else None)
            or (scenario.language if scenario else None), "mode": spec.mode,
            "persona": {"name": customer.name, "persona": customer.persona, "goal": customer.goal} if customer else None,
            "outcome": entry.get("outcome"), "reason": entry.get("reason"),
            "status": judgment.status if judgment else None, "verdict": judgment.verdict if judgment else None,
            "turns": _turns(files, cid),
            "recording": str(rec.relative_to(files.dir)) if rec.is_file() else None,
        }


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = pa.struct([("turn", pa.int64()), ("role", pa.string()), ("text", pa.string()),
                      ("started_at", pa.float64()), ("ended_at", pa.float64()), ("first_token_s", pa.float64()),
                      ("audio_start_s", pa.float64()), ("audio_end_s", pa.float64()), ("heard_text", pa.string())])
    persona = pa.struct([("name", pa.string()), ("persona", pa.string()), ("goal", pa.string())])
    schema = pa.schema([("batch_id", pa.string()), ("conversation_id", pa.string()), ("scenario_id", pa.string()),
                        ("label", pa.string()), ("trial", pa.int64()), ("language", pa.string()),
                        ("mode", pa.string()), ("persona", persona), ("outcome", pa.string()),
                        ("reason", pa.string()), ("status", pa.string()), ("verdict", pa.string()),
                        ("turns", pa.list_(turn)), ("recording", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def export_cmd(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    fmt: Annotated[Format, typer.Option("--format", help="jsonl or parquet.")] = Format.jsonl,
    out_path: Annotated[Path | None, typer.Option("--out", help="File to write (default: the batch's dataset.<fmt>).")
                        ] = None,
) -> None:
    """Export a batch as a dataset (one record per conversation), loadable by Hugging Face datasets as is."""
    files = evaluate.batch_files(batch_id)
    rows = list(records(files))
    path = out_path or files.dir / f"dataset.{fmt.value}"
    if path.is_dir():
        raise evaluate.fail(EXIT_BAD_INPUT, f"--out: {path} is a folder, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    (write_parquet if fmt is Format.parquet else write_jsonl)(rows, path)
    typer.echo(f"{len(rows)} conversation(s) of {batch_id} -> {path}")
