"""The webhook receiver's HTTP and NATS wiring (aiohttp).

``POST /webhook``: verify (401 on a bad signature, counted, never logged with its
token), keep the audited events, publish each to JetStream and answer 200 only once
JetStream acked it; if the publish fails the answer is 503 and livekit-server retries
with the same event id (deduplicated by Nats-Msg-Id). ``GET /healthz``: 200 while
NATS is connected.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext

from shared import bus
from shared.contracts import RoomWebhook
from shared.log import kv
from shared.metrics import WebhookMetrics

from . import core

log = logging.getLogger("webhook")

PATH = "/webhook"


class Receiver:
    def __init__(
        self, nc: Client, js: JetStreamContext, api_key: str, api_secret: str, metrics: WebhookMetrics
    ) -> None:
        self.nc = nc
        self.js = js
        self.metrics = metrics
        self._verifier, self._receiver = core.make_receiver(api_key, api_secret)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=core.MAX_BODY)
        app.router.add_post(PATH, self.handle)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        ok = self.nc.is_connected
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "nats disconnected\n")

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.requests.labels("bad_request").inc()
            return web.Response(status=413, text="too large\n")
        try:
            ev = core.verify(body, request.headers.get("Authorization"), self._verifier, self._receiver)
            event = core.to_event(ev, time.time())
            if event is None:
                self.metrics.requests.labels("ignored").inc()
                return web.Response(text="ignored\n")
            where = core.route(event)
        except core.Rejected as exc:
            self.metrics.requests.labels(exc.outcome).inc()
            log.warning("webhook rejected", extra=kv(status=exc.status, reason=exc.reason, peer=request.remote))
            return web.Response(status=exc.status, text=f"{exc.reason}\n")
        try:
            await bus.publish(self.js, where.subject, event, msg_id=where.msg_id, attempts=3)
        except Exception as exc:
            self.metrics.requests.labels("error").inc()
            log.error("publish failed; livekit-server will retry",
                      extra=kv(subject=where.subject, id=event.id, error=repr(exc)))
            return web.Response(status=503, text="not stored, retry\n")
        self.metrics.requests.labels("published").inc()
        self.metrics.events.labels(event.event).inc()
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        _log_event(event)
        return web.Response(text="ok\n")


def _log_event(event: RoomWebhook) -> None:
    log.debug("webhook stored", extra=kv(event=event.event, id=event.id, room=event.room, identity=event.identity))
