"""NATS plumbing shared by every process: connect, streams, publish, run.

Connections retry with backoff (tenacity) and reconnect forever once up;
JetStream publishes retry on timeouts. ``run`` installs uvloop and turns
SIGTERM/SIGINT into a clean shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import uvloop
from nats.aio.client import Client
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from shared import contracts, streams
from shared.log import kv

log = logging.getLogger(__name__)

# Largest payload the services accept (the server's max_payload is 1 MiB by default).
MAX_BODY = 64 * 1024


async def connect(url: str, name: str, *, connect_timeout_s: float = 30.0) -> Client:
    """Connect, retrying with backoff for up to ``connect_timeout_s``; reconnect forever after."""

    async def _cb_err(e: Exception) -> None:
        log.warning("nats error", extra=kv(error=str(e)))

    async for attempt in AsyncRetrying(
        stop=stop_after_delay(connect_timeout_s),
        wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
        retry=retry_if_exception_type((OSError, NoServersError, asyncio.TimeoutError)),
        reraise=True,
    ):
        with attempt:
            # nats-py retries a failed *first* connect forever when reconnects are unbounded,
            # so each try is bounded here and tenacity does the backing off.
            return await asyncio.wait_for(
                nats.connect(
                    url,
                    name=name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=_cb_err,
                    connect_timeout=2,
                ),
                timeout=5,
            )
    raise RuntimeError("unreachable")


async def jetstream(nc: Client) -> JetStreamContext:
    js = nc.jetstream(timeout=10)
    await streams.ensure_streams(js)
    return js


async def publish(
    js: JetStreamContext,
    subject: str,
    msg: Any,
    *,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
    attempts: int = 6,
) -> PubAck:
    """JetStream publish with retry; ``msg_id`` makes retries idempotent (dedupe window)."""
    body = msg if isinstance(msg, bytes) else contracts.encode(msg)
    hdrs = dict(headers or {})
    if msg_id:
        hdrs["Nats-Msg-Id"] = msg_id
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.05, max=2.0),
        retry=retry_if_exception_type((NatsTimeoutError, NoRespondersError, asyncio.TimeoutError)),
        reraise=True,
    ):
        with attempt:
            return await js.publish(subject, body, headers=hdrs or None)
    raise RuntimeError("unreachable")


def is_wrong_last_sequence(exc: APIError) -> bool:
    return exc.err_code == 10071


def run(main: Callable[[asyncio.Event], Awaitable[None]], *, use_uvloop: bool = True) -> None:
    """Run ``main(stop)`` on uvloop (or asyncio's own loop); ``stop`` is set on SIGTERM/SIGINT."""

    async def _wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    if use_uvloop:
        uvloop.run(_wrapper())
    else:
        asyncio.run(_wrapper())


async def replay(js: JetStreamContext, subject: str, union: Any, *, idle_s: float = 2.0) -> list[Any]:
    """Every stored event on ``subject`` (an ordered consumer from the start), decoded as ``union``;
    stops once no message has come for ``idle_s``."""
    sub = await js.subscribe(subject, ordered_consumer=True)
    events: list[Any] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_s)
            except NatsTimeoutError:
                return events
            events.append(contracts.decode_event(msg.data, union))
    finally:
        await sub.unsubscribe()
