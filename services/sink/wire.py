"""What every sink handler shares about a message: its stored time, its subject, dropping it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

from shared.contracts import ContractError
from shared.log import kv
from shared.metrics import SinkMetrics

log = logging.getLogger("sink")


def stored_at(msg: Msg) -> float:
    """The message's JetStream timestamp (server time)."""
    return msg.metadata.timestamp.timestamp()


def kind_of(event: Any) -> str:
    return str(type(event).__struct_config__.tag)


def subject_problem(subject: str, expected: Callable[[], str]) -> tuple[str, str] | None:
    """``(field, reason)`` unless ``subject`` is the one the event's ids give."""
    try:
        want = expected()
    except ContractError as exc:
        return exc.field, exc.reason
    if subject != want:
        return "subject", f"{subject!r} does not match the event's ids (expected {want!r})"
    return None


def drop(metrics: SinkMetrics, msg: Msg, field: str, reason: str, settle: list[Msg] | None = None) -> None:
    """Log and count an invalid message; ``settle``: where it waits to be acked (never stored)."""
    log.warning("event dropped", extra=kv(subject=msg.subject, field=field, reason=reason))
    metrics.dropped.labels("invalid").inc()
    if settle is not None:
        settle.append(msg)
