"""The batch-cancel contracts: the public ``batch.cancel`` command and the ``BatchCancelled`` event.

Part of :mod:`shared.contracts` (re-exported there, and ``BatchCancelled`` is one of its
``BatchEvent``s); apart only to keep each file short. See docs/ARCHITECTURE.md "batch.cancel".
"""

from __future__ import annotations

from shared.contracts_base import Struct
from shared.ids import BatchId


class CancelBatch(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Public command on ``batch.cancel``: start no new conversation of ``batch_id``; let the running
    ones finish; end the batch ``cancelled``. Answered like ``batch.start`` (a ``BatchReply``).
    Unknown fields are refused, as on ``batch.start``."""

    batch_id: BatchId


class BatchCancelled(Struct, frozen=True, kw_only=True, tag="batch_cancelled"):
    """A cancel the dispatcher accepted (``batch.evt.<id>``): from here on the batch dispatches nothing;
    retries waiting are dropped (their last failure is final), conversations in flight settle as usual,
    and ``BatchFinished`` follows with status ``cancelled``. ``never_started``: conversations not yet
    dispatched at the cancel (the finished batch's ``cancelled`` count)."""

    batch_id: BatchId
    never_started: int
    in_flight: int
    at: float
