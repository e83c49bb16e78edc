"""JetStream streams and every durable consumer on them, created idempotently at start-up.

Whichever process starts first creates the streams; later ones find them. A stream
that exists with other settings is updated to these. With per-service NATS identities (the secured
profile) the streams are the operator's (`./ct up` creates them): a service only waits for the ones
it uses (shared/natsauth.py ``ACCESS``), since it may not create, update or delete any. Each durable consumer is declared
here, beside its stream, as a :class:`Durable`; its owner binds it with :func:`bind`
(an existing durable keeps its old config in nats-py, so :func:`ensure_consumer`
updates it on mismatch).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from typing import Any, NamedTuple

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from shared import subjects

log = logging.getLogger(__name__)

DAY = 24 * 3600


def replicas() -> int:
    """``CROSSTALK_STREAM_REPLICAS`` (1 default; 3 on a 3-node NATS cluster): every stream's replicas,
    and so its consumers'. Checked with a clear error by ``shared.config.load`` at start-up."""
    raw = os.environ.get("CROSSTALK_STREAM_REPLICAS", "").strip()
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= 5 else 1


def _stream(
    name: str, subject_list: list[str], *, max_age: int, description: str, duplicate_window: int = 120, **more: Any
) -> StreamConfig:
    """A file-backed stream with limits retention; ``more`` are further :class:`StreamConfig` fields."""
    return StreamConfig(
        name=name,
        description=description,
        subjects=subject_list,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age,
        duplicate_window=duplicate_window,
        num_replicas=replicas(),
        **more,
    )


BATCH_CMDS = _stream(
    "BATCH_CMDS", [subjects.BATCH_START, subjects.BATCH_CANCEL], max_age=7 * DAY,
    description="batch.start and batch.cancel commands, captured so a core `nats pub` is never lost",
    # no_ack: JetStream must not answer a `nats request batch.start`; the dispatcher
    # replies with its verdict (accepted/rejected) once it has processed the command.
    no_ack=True,
)
BATCH_EVENTS = _stream(
    "BATCH_EVENTS", [subjects.BATCH_EVENTS_ALL, subjects.BATCH_REJECTED], max_age=30 * DAY,
    description="batch lifecycle events; the dispatcher's state is a fold of them",
)
CONVERSATIONS = _stream(
    "CONVERSATIONS", [subjects.CONV_ALL], max_age=30 * DAY,
    description="agent joins, turns and conversation ends from worker jobs",
)
ROLES = _stream(
    "ROLES", [subjects.ROLES_ALL], max_age=2 * DAY,
    description="role lease log, one subject per room and role; the allocator's only state",
    max_msgs_per_subject=16, discard=DiscardPolicy.OLD, allow_direct=True,
)
LIVEKIT_EVENTS = _stream(
    "LIVEKIT_EVENTS", [subjects.LK_ROOM_ALL], max_age=30 * DAY,
    description="livekit-server's webhooks (participants joined/left, rooms started/finished), verified",
    # livekit-server retries a failed webhook for up to ~2 minutes with the same event id
    duplicate_window=600,
)

ALL_STREAMS = (BATCH_CMDS, BATCH_EVENTS, CONVERSATIONS, ROLES, LIVEKIT_EVENTS)

# Voice mode: each listener's recording of its peer's track, until the sink has merged the
# conversation's stereo file (object names: :func:`recording_object`).
RECORDINGS_BUCKET = "crosstalk-recordings"
RECORDINGS_TTL_S = 2 * DAY


def recording_object(batch_id: str, conversation_id: str, attempt: int, role: str) -> str:
    """The object holding ``role``'s channel of one attempt (ids already validated by their types)."""
    return f"{batch_id}/{conversation_id}/{attempt}/{role}"


async def recordings(js: JetStreamContext) -> ObjectStore:
    """The recordings bucket, created on first use (file-backed, objects expire after two days;
    under per-service identities the operator created it)."""
    from shared import natsauth

    try:
        return await js.object_store(RECORDINGS_BUCKET)
    except BucketNotFoundError:
        if natsauth.streams_by_operator() and _service(js) != natsauth.OPERATOR:
            raise
        cfg = ObjectStoreConfig(description="voice-mode recordings per channel, merged by the sink",
                                ttl=RECORDINGS_TTL_S, storage=StorageType.FILE)
        return await js.create_object_store(RECORDINGS_BUCKET, config=cfg)


def _service(js: JetStreamContext) -> str:
    from shared import natsauth

    return natsauth.service_of(str(js._nc.options.get("name") or ""))


async def wait_for_streams(js: JetStreamContext, names: tuple[str, ...], timeout_s: float = 60.0) -> None:
    """Until each of ``names`` exists (the operator creates them at `./ct up`); RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                await js.stream_info(name)
                break
            except NotFoundError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stream {name} does not exist: the operator creates it (`./ct up`)") from None
                log.info("waiting for the operator's stream", extra={"stream": name})
                await asyncio.sleep(1.0)


async def ensure_streams(js: JetStreamContext) -> None:
    """Create or update every stream; under per-service identities, wait for this service's own."""
    from shared import natsauth

    service = _service(js)
    if natsauth.streams_by_operator() and service != natsauth.OPERATOR:
        known = natsauth.ACCESS.get(service)
        await wait_for_streams(js, known.waits_for if known else ())
        return
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
    filter_subject: str | list[str],
    *,
    deliver: DeliverPolicy = DeliverPolicy.ALL,
    ack_wait: float = 30.0,
    max_ack_pending: int = 1000,
    max_deliver: int = -1,
) -> ConsumerConfig:
    """An explicit-ack durable; a list of filters becomes ``filter_subjects``."""
    many = isinstance(filter_subject, list)
    return ConsumerConfig(
        durable_name=name,
        filter_subject=None if many else filter_subject,  # type: ignore[arg-type]
        filter_subjects=filter_subject if many else None,  # type: ignore[arg-type]
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=deliver,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        max_deliver=max_deliver,
    )


class Durable(NamedTuple):
    """A durable consumer declared beside its stream: the stream's name and the consumer's config."""

    stream: str
    config: ConsumerConfig

    @property
    def name(self) -> str:
        return str(self.config.durable_name)


async def bind(js: JetStreamContext, consumer: Durable) -> JetStreamContext.PullSubscription:
    """Create or update ``consumer`` and pull from it."""
    await ensure_consumer(js, consumer.stream, consumer.config)
    return await js.pull_subscribe_bind(durable=consumer.name, stream=consumer.stream)


# --------------------------------------------------------------------------- the consumers

# The dispatcher's batch.start and batch.cancel commands (BATCH_CMDS), one consumer so they are taken in
# the order they were stored (a cancel never overtakes the start it cancels). Few in flight: each waits
# for its verdict.
DISPATCHER_CMDS = Durable(
    str(BATCH_CMDS.name),
    durable("dispatcher-cmds", [subjects.BATCH_START, subjects.BATCH_CANCEL], ack_wait=60.0, max_ack_pending=64),
)


def dispatcher_conv(start: float | None = None) -> Durable:
    """The dispatcher's agent joins and conversation ends (CONVERSATIONS), ``dispatcher-conv``.

    The dispatcher deletes and re-adds it at every start: from ``start`` (server time, epoch
    seconds: the oldest attempt in flight, less a margin), or from new events when ``None``.
    Its config therefore changes per start, so it is added, not :func:`ensure_consumer`-ed.
    """
    cfg = durable(
        "dispatcher-conv",
        [subjects.CONV_JOINED_ALL, subjects.CONV_ENDED_ALL],
        deliver=DeliverPolicy.NEW if start is None else DeliverPolicy.BY_START_TIME,
        ack_wait=30.0,
        max_ack_pending=4000,
    )
    if start is not None:
        cfg.opt_start_time = datetime.datetime.fromtimestamp(start, datetime.UTC)  # type: ignore[assignment]
    return Durable(str(CONVERSATIONS.name), cfg)


class SinkConsumers(NamedTuple):
    """One transcript sink's four durables, all named ``<prefix>-<what>``."""

    conv: Durable  # turns, conversation ends, recordings -> transcripts, recordings, batch.json
    batch: Durable  # batch lifecycle events -> batch.json
    lk: Durable  # the room audit: livekit-server's webhooks
    roles: Durable  # the room audit: the allocator's grant log


def sink_consumers(
    prefix: str, *, deliver: str = "all", ack_wait_s: float = 30.0, max_ack_pending: int = 8192
) -> SinkConsumers:
    """``deliver``: "all" the whole stream history, "new" only what is published after the first start.
    ``max_ack_pending``: held (out-of-order) turns count against it."""
    policy = DeliverPolicy.NEW if deliver == "new" else DeliverPolicy.ALL

    def one(stream: StreamConfig, what: str, filters: list[str]) -> Durable:
        cfg = durable(f"{prefix}-{what}", filters, deliver=policy, ack_wait=ack_wait_s,
                      max_ack_pending=max_ack_pending)
        return Durable(str(stream.name), cfg)

    return SinkConsumers(
        conv=one(CONVERSATIONS, "conv", [subjects.conv_kind_filter("turn"), subjects.conv_kind_filter("ended"),
                                         subjects.conv_kind_filter("recording")]),
        batch=one(BATCH_EVENTS, "batch", [subjects.BATCH_EVENTS_ALL]),
        lk=one(LIVEKIT_EVENTS, "lk", [subjects.LK_ROOM_ALL]),
        roles=one(ROLES, "roles", [subjects.ROLES_ALL]),
    )
