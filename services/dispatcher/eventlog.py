"""The batch event log (``BATCH_EVENTS``): replay it, and append to it as its only writer.

An event is appended to ``batch.evt.<batch_id>`` with
``Nats-Expected-Last-Subject-Sequence``, so only one writer's history exists;
when another history got there first the batch is re-read from the stream and
the caller decides again. A stored event this version cannot decode stops the
dispatcher (:class:`UnreadableLog`): its state must be a fold of the log.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.errors import APIError

from shared import bus, contracts, streams, subjects
from shared.contracts import BatchEvent, ContractError
from shared.log import kv

from . import state
from .state import BatchState

log = logging.getLogger(__name__)

EVENTS_STREAM = str(streams.BATCH_EVENTS.name)


class UnreadableLog(RuntimeError):
    """A stored batch event this dispatcher cannot decode: its state would not be a fold of the log."""

    def __init__(self, subject: str, seq: int, exc: ContractError) -> None:
        super().__init__(f"{EVENTS_STREAM} sequence {seq} on {subject} cannot be decoded ({exc.field}: {exc.reason}); "
                         f"refusing to run on a log it cannot fold. Inspect it with "
                         f"`nats stream get {EVENTS_STREAM} {seq}`; run the crosstalk version that wrote it, "
                         f"or remove that message (`nats stream rmm {EVENTS_STREAM} {seq}`) knowingly")
        self.subject, self.seq, self.field, self.reason = subject, seq, exc.field, exc.reason


async def read_events(js: JetStreamContext, filter_subject: str) -> list[tuple[BatchEvent, int]]:
    """Every batch event on ``filter_subject``, in stream order, with its stream sequence."""
    out: list[tuple[BatchEvent, int]] = []
    for m in await bus.read_subject(js, filter_subject, stream=EVENTS_STREAM):
        try:
            out.append((contracts.decode_event(m.data, BatchEvent), m.metadata.sequence.stream))
        except ContractError as exc:
            # Skipping it would make the fold silently diverge from the log (a settled
            # conversation run again, a batch that never finishes): refuse instead.
            raise UnreadableLog(m.subject, m.metadata.sequence.stream, exc) from None
    return out


class BatchLog:
    """Every batch's state, always the fold of what its log holds, and the appends that extend it."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.batches: dict[str, BatchState] = {}
        self._running: set[str] = set()  # batch ids, so timers never walk finished batches

    def running(self) -> list[BatchState]:
        return [self.batches[b] for b in sorted(self._running)]

    def _put(self, bid: str, new: BatchState) -> None:
        self.batches[bid] = new
        (self._running.add if new.running else self._running.discard)(bid)

    async def load(self) -> int:
        """Replay the whole log; the number of events read."""
        events = await read_events(self.js, subjects.BATCH_EVENTS_ALL)
        for bid, new in state.replay(events).items():
            self._put(bid, new)
        return len(events)

    async def append(self, ev: BatchEvent) -> BatchState | None:
        """Append ``ev`` and fold it in: the batch's new state.

        None when the event does not apply, or when another history got there first (wrong
        last sequence, or our own earlier write whose ack was lost): the batch has then been
        re-read from the stream, and the caller decides again on what is there.
        """
        bid = state.batch_of(ev)
        old = self.batches.get(bid)
        expected = old.seq if old else 0
        try:
            ack = await bus.publish(
                self.js, subjects.batch_events(bid), ev, msg_id=f"{bid}-{expected + 1}",
                headers={"Nats-Expected-Last-Subject-Sequence": str(expected)})
        except APIError as exc:
            if not bus.is_wrong_last_sequence(exc):
                raise
            log.warning("batch log moved under us, reloading", extra=kv(batch_id=bid, expected=expected))
            await self.reload(bid)
            return None
        if ack.duplicate:
            # Same Msg-Id already stored: an earlier write whose outcome we never learned. The log,
            # not this event, is the truth.
            await self.reload(bid)
            return None
        new = state.evolve(old, ev, ack.seq)
        if new is not None:
            self._put(bid, new)
        return new

    async def reload(self, bid: str) -> None:
        """Re-fold one batch from its log."""
        new = state.replay(await read_events(self.js, subjects.batch_events(bid))).get(bid)
        if new is not None:
            self._put(bid, new)
