"""``python -m services.allocator``: serve role.request / role.release until SIGTERM."""

from __future__ import annotations

from services.allocator import main
from shared import bus, config, metrics
from shared import log as logs
from shared.log import kv


def entrypoint() -> None:
    log = logs.setup("allocator")
    settings = config.load_or_exit(log)
    port = metrics.serve("allocator", settings.metrics_host, settings.metrics_port)
    log.info("starting", extra=kv(settings=str(settings), metrics_port=port))
    bus.run(lambda stop: main.run(settings, stop))


if __name__ == "__main__":
    entrypoint()
