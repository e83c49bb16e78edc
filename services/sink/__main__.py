"""``python -m services.sink``: the transcript sink.

Consumes turns, conversation ends and batch events from JetStream and writes
``$CROSSTALK_DATA_DIR/batches/<batch_id>/{batch.json,conversations/*.jsonl}``.
Durable consumer names come from CROSSTALK_SINK_DURABLE (default ``sink``);
Prometheus metrics are served on the sink's metrics port (shared.metrics).
"""

from __future__ import annotations

import asyncio
import os
import sys

from shared import bus
from shared.config import load_or_exit
from shared.log import kv, setup
from shared.metrics import SinkMetrics, serve

from .files import DataDir
from .main import Sink


def main() -> None:
    log = setup("sink")
    settings = load_or_exit(log)
    try:
        DataDir(settings.data_dir)
        if not os.access(settings.data_dir, os.W_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        log.error("bad configuration", extra=kv(var="CROSSTALK_DATA_DIR", reason=str(exc)))
        sys.exit(2)
    metrics = SinkMetrics()

    async def run(stop: asyncio.Event) -> None:
        metrics_port = serve("sink", settings.metrics_host, settings.metrics_port)
        nc = await bus.connect(settings.nats_url, "crosstalk-sink")
        try:
            js = await bus.jetstream(nc)
            sink = Sink(js, settings, metrics)
            await sink.start()
            log.info(
                "sink consuming",
                extra=kv(
                    data_dir=str(sink.io.dirs.root),
                    consumers=[c.name for c in sink.consumers],
                    deliver=settings.sink_deliver,
                    ack_wait_s=settings.sink_ack_wait_s,
                    metrics_port=metrics_port,
                ),
            )
            await sink.run(stop)
        finally:
            await nc.drain()
        log.info("sink stopped")

    bus.run(run)


if __name__ == "__main__":
    main()
