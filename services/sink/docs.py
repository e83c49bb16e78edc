"""Every running batch's ``batch.json`` in memory, and the flush that makes it durable.

Batch events, conversation ends and room-audit facts evolve a document (the pure fold
in ``core.batch_doc``); their messages wait here and are acked only once a rewrite of
``batch.json`` that reflects them is on disk (atomic replace, ``files.write_atomic``),
at most every ``flush_interval_s``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping

from nats.aio.msg import Msg

from shared import bus
from shared.contracts import LeaseEvent, RoomWebhook
from shared.log import kv

from . import core, files
from .core import BatchDoc, BatchDocEvent
from .core.voice import VoiceMetrics

log = logging.getLogger("sink")


class Docs:
    def __init__(self, io: files.Io) -> None:
        self.io = io
        self._docs: dict[str, BatchDoc] = {}
        self._dirty: set[str] = set()
        self._waiting: dict[str, list[Msg]] = defaultdict(list)

    async def get(self, batch_id: str) -> BatchDoc:
        """The document in memory, else as on disk, else a new one (ContractError for a bad id)."""
        doc = self._docs.get(batch_id)
        if doc is None:
            found = await self.io.run(files.read_doc, self.io.dirs.batch_json(batch_id))
            # Another consumer loop may have loaded (and evolved) it meanwhile: keep that one.
            doc = self._docs.setdefault(batch_id, found if found is not None else BatchDoc(batch_id=batch_id))
        return doc

    def _set(self, batch_id: str, old: BatchDoc, new: BatchDoc, acks: list[Msg]) -> None:
        if new is not old:
            self._docs[batch_id] = new
            self._dirty.add(batch_id)
        self._waiting[batch_id].extend(acks)  # acked once the doc that reflects them is on disk

    async def apply(self, event: BatchDocEvent, msg: Msg) -> None:
        batch_id = core.batch_of(event)
        doc = await self.get(batch_id)
        new = core.evolve(doc, event)
        if (stale := core.superseded_recording(doc, new, event)) is not None:
            # before the document says so: a crash between leaves no file the (redelivered) event would keep
            try:
                await self.io.run(self.io.dirs.recording(batch_id, stale).unlink, True)
            except OSError as exc:
                log.error("stale recording not removed", extra=kv(batch_id=batch_id, conversation_id=stale,
                                                                  error=str(exc)))
        self._set(batch_id, doc, new, [msg])

    async def audit(self, batch_id: str, fact: RoomWebhook | LeaseEvent, seq: int | None, msg: Msg) -> None:
        doc = await self.get(batch_id)
        self._set(batch_id, doc, core.audit_fact(doc, fact, seq), [msg])

    async def flag_conflict(self, batch_id: str, conversation_id: str, acks: list[Msg]) -> None:
        doc = await self.get(batch_id)
        self._set(batch_id, doc, core.flag_conflict(doc, conversation_id), acks)

    async def set_voice(self, batch_id: str, conversation_id: str, metrics: VoiceMetrics, acks: list[Msg]) -> None:
        doc = await self.get(batch_id)
        self._set(batch_id, doc, core.set_voice(doc, conversation_id, metrics), acks)

    def mark_incomplete(self, batch_id: str, short: Mapping[str, int]) -> None:
        doc = self._docs[batch_id]
        self._set(batch_id, doc, core.mark_incomplete(doc, short), [])

    async def flush(self) -> None:
        """Write every changed batch.json atomically, then ack the events it reflects."""
        for batch_id in list(self._dirty | self._waiting.keys()):
            acks = self._waiting.pop(batch_id, [])
            if batch_id in self._dirty:
                doc = self._docs[batch_id]
                self._dirty.discard(batch_id)
                try:
                    await self.io.run(self._write, batch_id, doc)
                except OSError as exc:
                    log.error("batch.json write failed; will retry", extra=kv(batch_id=batch_id, error=str(exc)))
                    self._dirty.add(batch_id)
                    self._waiting[batch_id][:0] = acks
                    continue
            await bus.ack(acks)
            current = self._docs.get(batch_id)
            if current is not None and current.status != "running" and batch_id not in self._dirty:
                if not self._waiting.get(batch_id):
                    self._docs.pop(batch_id, None)  # finished: re-read from disk if ever needed

    def _write(self, batch_id: str, doc: BatchDoc) -> None:
        path = self.io.dirs.batch_json(batch_id)
        self.io.dirs.ensure_dir(path.parent)
        files.write_atomic(path, core.encode_doc(doc))
