"""``batch.cancel``: decoded, and decided. Pure: no bytes beyond the decode, no clock, no I/O.

A cancel the dispatcher accepts is one :class:`BatchCancelled` in the batch's log; from then on
the fold (:mod:`.state`) dispatches nothing more of that batch, and :func:`.core.on_tick` settles
its dropped retries for good and finishes it ``cancelled`` once nothing is in flight. Being an
event, it survives a restart: a replayed log gives a batch that is still cancelled.

Conversations in flight are left to finish, not stopped: their time is already bounded by the
join deadline and ``conversation_timeout_s``, and a room deleted mid-way would only turn a
conversation that was about to complete into an ``agent_left`` failure, a half transcript and a
judgment counted against crosstalk (an infra failure), polluting both the verdicts and the data
the batch was producing.
"""

from __future__ import annotations

import msgspec

from shared import bus, contracts
from shared.contracts import BatchCancelled, BatchEvent, BatchReply, CancelBatch, ContractError

from .state import BatchState
from .validate import Rejection

UNKNOWN = "unknown batch: no batch.start with this id was accepted"
ALREADY_CANCELLED = "already cancelled; the first cancel stands"


class CancelReceived(msgspec.Struct, frozen=True, kw_only=True):
    """A stored ``batch.cancel``, decoded (or refused naming the field)."""

    command: CancelBatch | Rejection
    seq: int  # BATCH_CMDS stream sequence


def decode_cancel(body: bytes) -> CancelBatch | Rejection:
    try:
        return contracts.decode(body, CancelBatch, max_bytes=bus.MAX_BODY)
    except ContractError as exc:
        return Rejection(field=exc.field, reason=exc.reason)


def on_cancel(state: BatchState | None, batch_id: str, now: float) -> tuple[BatchReply, list[BatchEvent]]:
    """The reply to a cancel of ``batch_id``, and the events it appends (none unless it is accepted)."""
    if state is None:
        return BatchReply(accepted=False, batch_id=batch_id, field="batch_id", reason=UNKNOWN), []
    if state.cancelled_at is not None or state.status == "cancelled":
        return BatchReply(accepted=True, batch_id=batch_id, duplicate=True, reason=ALREADY_CANCELLED), []
    if not state.running:
        return BatchReply(accepted=False, batch_id=batch_id, field="batch_id",
                          reason=f"batch already finished ({state.status}); there is nothing to cancel"), []
    ev = BatchCancelled(batch_id=state.spec.batch_id, never_started=state.never_started,
                        in_flight=len(state.in_flight), at=now)
    return BatchReply(accepted=True, batch_id=batch_id), [ev]
