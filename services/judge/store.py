"""The files of one batch the judge and the report read and write, with validated paths.

    <data_dir>/batches/<batch_id>/batch.json                          (the sink's)
    <data_dir>/batches/<batch_id>/conversations/<conversation_id>.jsonl (the sink's)
    <data_dir>/batches/<batch_id>/plan.json                           the accepted spec, scenarios included
    <data_dir>/batches/<batch_id>/judgments/<conversation_id>.json    one Judgment each
    <data_dir>/batches/<batch_id>/judged.json                         BatchJudged: every conversation judged
    <data_dir>/batches/<batch_id>/recordings/<conversation_id>.wav    a voice recording, when one exists

Every id is checked against its rule before it becomes a path, and the path must resolve inside
the data directory. Writes are atomic (services.sink.files.write_atomic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from services.sink.files import write_atomic
from shared import contracts
from shared.contracts import ID_RULE, TOKEN_RULE, BatchJudged, BatchSpec, ContractError

from .checks import Turn
from .core import Judgment

_enc = msgspec.json.Encoder()
_judgment = msgspec.json.Decoder(Judgment)
_spec = msgspec.json.Decoder(BatchSpec)
_judged = msgspec.json.Decoder(BatchJudged)
# numeric fields of a transcript line that are not timings
_NOT_TIMINGS = frozenset({"turn", "attempt", "started_at", "ended_at", "first_token_s", "total_s"})


def pretty(obj: Any) -> bytes:
    return msgspec.json.format(_enc.encode(obj), indent=2) + b"\n"


class BatchFiles:
    def __init__(self, data_dir: Path, batch_id: str) -> None:
        if not contracts.is_id(batch_id):
            raise ContractError("batch_id", ID_RULE)
        self.root = data_dir.resolve()
        self.batch_id = batch_id
        self.dir = self._inside(self.root / "batches" / batch_id, "batch_id")

    def _inside(self, path: Path, field: str) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ContractError(field, "resolves outside the data directory")
        return resolved

    def _conv(self, folder: str, conversation_id: str, suffix: str) -> Path:
        if not contracts.is_token(conversation_id):
            raise ContractError("conversation_id", TOKEN_RULE)
        return self._inside(self.dir / folder / f"{conversation_id}{suffix}", "conversation_id")

    @property
    def batch_json(self) -> Path:
        return self.dir / "batch.json"

    @property
    def judged_json(self) -> Path:
        return self.dir / "judged.json"

    @property
    def plan_json(self) -> Path:
        return self.dir / "plan.json"

    def transcript(self, conversation_id: str) -> Path:
        return self._conv("conversations", conversation_id, ".jsonl")

    def judgment_path(self, conversation_id: str) -> Path:
        return self._conv("judgments", conversation_id, ".json")

    def recording(self, conversation_id: str) -> Path:
        return self._conv("recordings", conversation_id, ".wav")

    # ------------------------------------------------------------------ reads

    def batch_doc(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.batch_json.read_bytes())
        except FileNotFoundError:
            return None
        return doc if isinstance(doc, dict) else None

    def turn_lines(self, conversation_id: str) -> list[dict[str, Any]]:
        """The transcript's lines as stored, in order; a torn last line (a crash mid-append) is left out."""
        try:
            raw = self.transcript(conversation_id).read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in raw.splitlines():
            try:
                fields = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(fields, dict) and isinstance(fields.get("turn"), int):
                out.append(fields)
        return sorted(out, key=lambda f: f["turn"])

    def turns(self, conversation_id: str) -> list[Turn]:
        """The transcript's turns as the checks read them (every other number a timing)."""
        out = []
        for fields in self.turn_lines(conversation_id):
            try:
                turn = msgspec.convert(fields, Turn)
            except msgspec.ValidationError:
                continue
            timings = {k: float(v) for k, v in fields.items() if k not in _NOT_TIMINGS
                       and isinstance(v, int | float) and not isinstance(v, bool)}
            out.append(msgspec.structs.replace(turn, timings=timings))
        return out

    def plan(self) -> BatchSpec | None:
        try:
            return _spec.decode(self.plan_json.read_bytes())
        except FileNotFoundError:
            return None

    def judgment(self, conversation_id: str) -> Judgment | None:
        try:
            return _judgment.decode(self.judgment_path(conversation_id).read_bytes())
        except FileNotFoundError:
            return None

    def judged(self) -> BatchJudged | None:
        """The batch's BatchJudged once judging finished (None before, or when a conversation was judged again since)."""
        try:
            event = _judged.decode(self.judged_json.read_bytes())
        except FileNotFoundError:
            return None
        return event

    def judgments(self) -> list[Judgment]:
        folder = self.dir / "judgments"
        if not folder.is_dir():
            return []
        return [_judgment.decode(p.read_bytes()) for p in sorted(folder.glob("*.json"))]

    # ------------------------------------------------------------------ writes

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def write_plan(self, spec: BatchSpec) -> None:
        self._write(self.plan_json, pretty(spec))

    def write_judgment(self, j: Judgment) -> None:
        self.judged_json.unlink(missing_ok=True)  # judging again: not finished until judged.json is rewritten
        self._write(self.judgment_path(j.conversation_id), pretty(j))

    def write_judged(self, event: BatchJudged) -> None:
        self._write(self.judged_json, pretty(event))
