"""The transcript sink run in the test's own process, on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from services.sink.main import Sink, Tuning
from shared import bus
from shared.config import Settings
from shared.metrics import SinkMetrics


@asynccontextmanager
async def running_sink(nats_url: str, data_dir: Path, durable: str, **overrides: Any) -> AsyncIterator[Sink]:
    """A started sink with durables ``<durable>-*`` delivering only new events; ``overrides``: its :class:`Tuning`."""
    nc = await bus.connect(nats_url, f"test-{durable}")
    js = await bus.jetstream(nc)
    settings = Settings(data_dir=data_dir, sink_durable=durable, sink_deliver="new", sink_ack_wait_s=3.0)
    tuning = Tuning(**{"flush_interval_s": 0.05, **overrides})
    sink = Sink(js, settings, SinkMetrics(CollectorRegistry()), tuning)
    await sink.start()
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        yield sink
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.drain()


async def drained(sink: Sink) -> bool:
    """Nothing pending or unacknowledged on any of the sink's consumers."""
    for consumer in sink.consumers:
        info = await sink.js.consumer_info(consumer.stream, consumer.name)
        if info.num_pending or info.num_ack_pending:
            return False
    return True
