"""The sink's files: validated paths, durable appends, atomic replaces, recovery.

Everything here is blocking file I/O, run in the sink's I/O threads (:class:`Io`).
A write returns only once the data is on disk (``fsync``), and a file that is
rewritten is replaced atomically (temporary file, ``fsync``, ``os.replace``,
``fsync`` of the directory), so a reader or a restarted sink sees the old content
or the new, never a mix. A SIGKILL in the middle of an append can leave a partial
last line; :func:`recover_transcript` cuts it off.

Layout (docs/ARCHITECTURE.md, data directory)::

    <data_dir>/batches/<batch_id>/batch.json
    <data_dir>/batches/<batch_id>/conversations/<conversation_id>.jsonl
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from shared.contracts import ID_RULE, TOKEN_RULE, ContractError, is_id, is_token
from shared.log import kv

from .core import BatchDoc, TurnLine, decode_doc, decode_line

log = logging.getLogger("sink.files")
R = TypeVar("R")


class DataDir:
    """Paths under the data directory. Ids are validated, then the path is resolved
    (symlinks included) and must still be inside the directory."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self._known_dirs: set[Path] = {self.root}
        self._paths: dict[tuple[str, str, str], Path] = {}

    def batch_json(self, batch_id: str) -> Path:
        return self._path("batch", batch_id, "")

    def transcript(self, batch_id: str, conversation_id: str) -> Path:
        return self._path("transcript", batch_id, conversation_id)

    def recording(self, batch_id: str, conversation_id: str) -> Path:
        return self._path("recording", batch_id, conversation_id)

    def _path(self, kind: str, batch_id: str, conversation_id: str) -> Path:
        key = (kind, batch_id, conversation_id)
        cached = self._paths.get(key)
        if cached is not None:
            return cached
        if not is_id(batch_id):
            raise ContractError("batch_id", ID_RULE)
        batch_dir = self.root / "batches" / batch_id
        if kind == "batch":
            path = batch_dir / "batch.json"
        else:
            if not is_token(conversation_id):
                raise ContractError("conversation_id", TOKEN_RULE)
            path = (batch_dir / "recordings" / f"{conversation_id}.wav" if kind == "recording"
                    else batch_dir / "conversations" / f"{conversation_id}.jsonl")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            field = "batch_id" if kind == "batch" else "conversation_id"
            raise ContractError(field, "resolves outside the data directory")
        if len(self._paths) > 100_000:
            self._paths.clear()
        self._paths[key] = resolved
        return resolved

    def ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` (and parents) durably: each new entry's parent is fsynced."""
        if directory in self._known_dirs:
            return
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            fsync_dir(d.parent)
        self._known_dirs.add(directory)


class Io:
    """The data directory and the threads its blocking I/O runs in."""

    def __init__(self, root: Path, threads: int) -> None:
        self.dirs = DataDir(root)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sink-io")

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per file: the name can be fixed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append(path: Path, data: bytes) -> None:
    """Append ``data`` and fsync. On failure the file is cut back to its old size."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # no O_CREAT: files start by write_atomic
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Recovered:
    """A transcript file as found: ``lines`` valid turns (0..lines-1) of ``attempt``."""

    attempt: int
    lines: int
    truncated_bytes: int = 0
    quarantined: Path | None = None


def recover_transcript(path: Path) -> Recovered:
    """Read a transcript, repairing what a crash can leave behind.

    A trailing partial line (SIGKILL mid-append) is cut off. Lines that are not the
    contiguous turns of one attempt (never written by this sink) are moved aside to
    ``.<name>.corrupt-<ts>`` and the valid prefix is kept.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Recovered(0, 0)
    end = data.rfind(b"\n") + 1
    truncated = len(data) - end
    if truncated:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "partial last line cut off", extra=kv(path=str(path), bytes=truncated)
        )
    raw_lines = data[:end].split(b"\n")[:-1]
    attempt, valid = 0, 0
    for i, raw in enumerate(raw_lines):
        try:
            line = decode_line(raw)
        except msgspec.DecodeError:
            break
        if line.turn != i or (i > 0 and line.attempt != attempt) or line.attempt < 1:
            break
        attempt, valid = line.attempt, i + 1
    if valid == len(raw_lines):
        return Recovered(attempt, valid, truncated)
    aside = path.with_name(f".{path.name}.corrupt-{int(time.time() * 1000)}")
    os.replace(path, aside)
    write_atomic(path, b"".join(line + b"\n" for line in raw_lines[:valid]))
    log.error(
        "transcript had lines this sink never wrote; kept the valid prefix",
        extra=kv(path=str(path), valid_lines=valid, lines=len(raw_lines), moved_to=str(aside)),
    )
    return Recovered(attempt, valid, truncated, aside)


def read_doc(path: Path) -> BatchDoc | None:
    """The batch document on disk, or ``None``. An unreadable one is moved aside."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode_doc(data)
    except msgspec.DecodeError as exc:
        aside = path.with_name(f".{path.name}.corrupt-{int(time.time() * 1000)}")
        os.replace(path, aside)
        log.error("unreadable batch.json moved aside", extra=kv(path=str(path), error=str(exc)))
        return None


def read_turn(path: Path, turn: int) -> TurnLine | None:
    """Line ``turn`` of a transcript (turn ``n`` is line ``n``), or None if the file is shorter."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    raw = data.split(b"\n")
    if turn >= len(raw) - 1:  # the last element follows the final newline
        return None
    return decode_line(raw[turn])
