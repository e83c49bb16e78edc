"""JetStream streams and durable consumers, created idempotently at start-up.

Whichever process starts first creates them; later ones find them. A stream
that exists with other settings is updated to these (an existing durable
consumer keeps its old config in nats-py, so consumers are created with
``ensure_consumer``, which updates on mismatch).
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from shared import subjects

log = logging.getLogger(__name__)

BATCH_CMDS = StreamConfig(
    name="BATCH_CMDS",
    description="batch.start commands, captured so a core `nats pub` is never lost",
    subjects=[subjects.BATCH_START],
    # no_ack: JetStream must not answer a `nats request batch.start`; the dispatcher
    # replies with its verdict (accepted/rejected) once it has processed the command.
    no_ack=True,
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_age=7 * 24 * 3600,
    duplicate_window=120,
)
BATCH_EVENTS = StreamConfig(
    name="BATCH_EVENTS",
    description="batch lifecycle events; the dispatcher's state is a fold of them",
    subjects=[subjects.BATCH_EVENTS_ALL, subjects.BATCH_REJECTED],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_age=30 * 24 * 3600,
    duplicate_window=120,
)
CONVERSATIONS = StreamConfig(
    name="CONVERSATIONS",
    description="agent joins, turns and conversation ends from worker jobs",
    subjects=[subjects.CONV_ALL],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_age=30 * 24 * 3600,
    duplicate_window=120,
)
ROLES = StreamConfig(
    name="ROLES",
    description="role lease log, one subject per room and role; the allocator's only state",
    subjects=[subjects.ROLES_ALL],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_age=2 * 24 * 3600,
    max_msgs_per_subject=16,
    allow_direct=True,
    discard=DiscardPolicy.OLD,
    duplicate_window=120,
)

LIVEKIT_EVENTS = StreamConfig(
    name="LIVEKIT_EVENTS",
    description="livekit-server's webhooks (participants joined/left, rooms started/finished), verified",
    subjects=[subjects.LK_ROOM_ALL],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_age=30 * 24 * 3600,
    # livekit-server retries a failed webhook for up to ~2 minutes with the same event id
    duplicate_window=600,
)

ALL_STREAMS = (BATCH_CMDS, BATCH_EVENTS, CONVERSATIONS, ROLES, LIVEKIT_EVENTS)


async def ensure_streams(js: JetStreamContext) -> None:
    for cfg in ALL_STREAMS:
        try:
            await js.add_stream(cfg)
        except BadRequestError as exc:
            # 10058: stream name already in use with a different configuration
            if exc.err_code == 10058:
                await js.update_stream(cfg)
            else:
                raise


async def ensure_consumer(js: JetStreamContext, stream: str, cfg: ConsumerConfig) -> None:
    """Create or update a durable consumer so its config is always ours."""
    assert cfg.durable_name
    try:
        info = await js.consumer_info(stream, cfg.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, cfg)
        return
    c = info.config
    if (
        c.filter_subject != cfg.filter_subject
        or (c.filter_subjects or None) != (cfg.filter_subjects or None)
        or c.max_ack_pending != cfg.max_ack_pending
        or c.ack_wait != cfg.ack_wait
    ):
        await js.add_consumer(stream, cfg)  # nats-server updates an existing durable in place


def durable(
    name: str,
    filter_subject: str,
    *,
    ack_wait: float = 30.0,
    max_ack_pending: int = 1000,
    max_deliver: int = -1,
) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=name,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        max_deliver=max_deliver,
    )
