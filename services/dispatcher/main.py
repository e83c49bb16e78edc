"""The dispatcher's bootstrap: connect, replay the batch log, bind the consumers, run the inputs.

On start the dispatcher replays ``BATCH_EVENTS`` (refusing a log it cannot
decode: exit code 3), reconciles LiveKit rooms with the replayed state and
resumes every unfinished batch; :class:`.inputs.Inputs` then feeds every input
to the handler table in :mod:`.handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared import bus, streams
from shared.config import Settings
from shared.log import kv
from shared.metrics import DispatcherMetrics

from .eventlog import BatchLog, UnreadableLog
from .handlers import Dispatcher
from .inputs import Inputs
from .rooms import Rooms

log = logging.getLogger(__name__)

# Conversation events are re-read from this long before the oldest in-flight dispatch (clock skew).
REPLAY_MARGIN_S = 60.0


async def conv_consumer(js: JetStreamContext, oldest: float | None) -> JetStreamContext.PullSubscription:
    """(Re)create ``dispatcher-conv`` to start at the oldest in-flight attempt (or at new events)."""
    consumer = streams.dispatcher_conv(None if oldest is None else oldest - REPLAY_MARGIN_S)
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(consumer.stream, consumer.name)
    await js.add_consumer(consumer.stream, consumer.config)
    return await js.pull_subscribe_bind(durable=consumer.name, stream=consumer.stream)


async def start(settings: Settings, nc: Client, js: JetStreamContext, rooms: Rooms,
                metrics: DispatcherMetrics) -> Inputs:
    """Replay the batch log, bind the durable consumers, reconcile LiveKit rooms."""
    batch_log = BatchLog(js)
    events = await batch_log.load()
    d = Dispatcher(settings, js, batch_log, rooms, metrics)
    d.gauges()
    running = batch_log.running()
    log.info("replayed batch events", extra=kv(events=events, batches=len(batch_log.batches), running=len(running)))
    cmd_sub = await streams.bind(js, streams.DISPATCHER_CMDS)
    oldest = min((s.convs[c].dispatched_at for s in running for c in s.in_flight), default=None)
    conv_sub = await conv_consumer(js, oldest)
    try:
        names = await rooms.names()
    except Exception as exc:
        log.warning("could not list rooms at start", extra=kv(error=str(exc)))
        names = []
    d.resume(names)
    return Inputs(d, rooms, nc, cmd_sub, conv_sub)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    metrics = DispatcherMetrics()
    nc = await bus.connect(settings.nats_url, "dispatcher")
    js = await bus.jetstream(nc)
    rooms = Rooms(settings, metrics)
    try:
        try:
            inputs = await start(settings, nc, js, rooms, metrics)
        except UnreadableLog as exc:
            log.error("cannot fold the batch event log", extra=kv(seq=exc.seq, subject=exc.subject, field=exc.field,
                                                                  reason=exc.reason, error=str(exc)))
            raise SystemExit(3) from None
        await inputs.serve(stop)
    finally:
        await rooms.aclose()
        # close, not drain: every publish was awaited and every message acked explicitly.
        with contextlib.suppress(Exception):
            await nc.close()
