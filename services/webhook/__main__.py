"""``python -m services.webhook``: livekit-server's webhooks -> JetStream (``lk.room.<room>.<event>``).

Listens on CROSSTALK_WEBHOOK_HOST:CROSSTALK_WEBHOOK_PORT (127.0.0.1:8089) at ``/webhook``;
livekit-server's config points ``webhook.urls`` there and signs with ``webhook.api_key``,
whose secret this process needs (LIVEKIT_API_KEY / LIVEKIT_API_SECRET). Prometheus
metrics on the webhook metrics port (shared.metrics).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from shared import bus
from shared.config import load_or_exit
from shared.log import kv, setup
from shared.metrics import WebhookMetrics, serve

from .main import PATH, Receiver


def main() -> None:
    log = setup("webhook")
    settings = load_or_exit(log)
    metrics = WebhookMetrics()

    async def run(stop: asyncio.Event) -> None:
        metrics_port = serve("webhook", settings.metrics_host, settings.metrics_port)
        nc = await bus.connect(settings.nats_url, "crosstalk-webhook")
        runner: web.AppRunner | None = None
        try:
            js = await bus.jetstream(nc)
            receiver = Receiver(nc, js, settings.livekit_api_key, settings.livekit_api_secret, metrics)
            runner = web.AppRunner(receiver.app(), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, settings.webhook_host, settings.webhook_port)
            await site.start()
            log.info("webhook receiver listening", extra=kv(
                url=f"http://{settings.webhook_host}:{settings.webhook_port}{PATH}",
                api_key=settings.livekit_api_key, metrics_port=metrics_port))
            await stop.wait()
        finally:
            if runner is not None:
                await runner.cleanup()
            await nc.drain()
        log.info("webhook receiver stopped")

    bus.run(run)


if __name__ == "__main__":
    main()
