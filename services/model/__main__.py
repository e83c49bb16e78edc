"""``python -m services.model``: the scripted model on CROSSTALK_MODEL_HOST:CROSSTALK_MODEL_PORT.

Latency comes from CROSSTALK_MODEL_TTFT_MS and CROSSTALK_MODEL_TOKENS_PER_S; with
CROSSTALK_MODEL_SERVED_LOG=<file> every completion served is logged there (JSONL);
Prometheus metrics are served on the model's metrics port (shared.metrics).
"""

from __future__ import annotations

import asyncio

from shared import bus
from shared.config import load_or_exit
from shared.log import kv, setup
from shared.metrics import ModelMetrics, serve

from .main import serve_in_background


def main() -> None:
    log = setup("model")
    settings = load_or_exit(log)
    metrics = ModelMetrics()

    async def run(stop: asyncio.Event) -> None:
        metrics_port = serve("model", settings.metrics_host, settings.metrics_port)
        async with serve_in_background(
            settings.model_host,
            settings.model_port,
            settings.model_ttft_ms,
            settings.model_tokens_per_s,
            model_name=settings.model_name,
            metrics=metrics,
            served_log=settings.model_served_log,
        ) as url:
            log.info(
                "scripted model serving",
                extra=kv(
                    url=url,
                    model=settings.model_name,
                    ttft_ms=settings.model_ttft_ms,
                    rate_per_s=settings.model_tokens_per_s,  # a key named *token* would be masked
                    metrics_port=metrics_port,
                ),
            )
            await stop.wait()
        log.info("scripted model stopped")

    bus.run(run)


if __name__ == "__main__":
    main()
