"""``python -m services.dispatcher``: run the dispatcher (configuration from the environment)."""

from __future__ import annotations

import asyncio
import logging

from shared import bus, config, log, metrics
from shared.log import kv

from .main import run


def main() -> None:
    logger = log.setup("dispatcher")
    logging.captureWarnings(True)  # library warnings become JSON log lines too
    settings = config.load_or_exit(logger)
    port = metrics.serve("dispatcher", settings.metrics_host, settings.metrics_port)
    logger.info("starting", extra=kv(settings=str(settings), metrics_port=port))

    async def _main(stop: asyncio.Event) -> None:
        await run(settings, stop)

    bus.run(_main)


if __name__ == "__main__":
    main()
