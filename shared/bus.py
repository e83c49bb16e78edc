"""NATS plumbing shared by every process: connect, publish, fetch, ack/nak, replay, run.

Connections retry with backoff (tenacity) and reconnect forever once up;
JetStream publishes retry on timeouts. ``fetch`` bounds nats-py's pull from outside;
``ack``/``nak`` settle messages quietly (a lost ack only means a redelivery);
``read_subject``/``replay`` read what a stream stores on a subject, in order.
``run`` installs uvloop and turns SIGTERM/SIGINT into a clean shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import nats
import nats.errors
import uvloop
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError, NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import APIError, NoStreamResponseError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import StopBaseT

from shared import contracts, natsauth, streams
from shared.log import kv
from shared.servertime import parse_ts

log = logging.getLogger(__name__)

# No answer (yet): a timeout, or nobody subscribed to a request subject.
NO_ANSWER: tuple[type[BaseException], ...] = (NatsTimeoutError, NoRespondersError, asyncio.TimeoutError)
# A JetStream publish nobody stored yet: on a cluster, the stream's leader is being elected (a node
# died: measured, `nats: no response from stream` for a few seconds, which failed turns and jobs).
NOT_STORED: tuple[type[BaseException], ...] = (*NO_ANSWER, NoStreamResponseError)
# ...so a publish keeps trying for at least this long, whatever its number of attempts.
PUBLISH_WINDOW_S = 20.0


def retrying(
    stop: StopBaseT, retry_on: tuple[type[BaseException], ...], *, multiplier: float = 0.1
) -> AsyncRetrying:
    """Retry ``retry_on`` errors with jittered exponential backoff (capped at 2 s) until ``stop``,
    then re-raise the last one. Use as ``async for attempt in retrying(...): with attempt: ...``."""
    return AsyncRetrying(
        stop=stop,
        wait=wait_exponential_jitter(multiplier=multiplier, max=2.0),
        retry=retry_if_exception_type(retry_on),
        reraise=True,
    )


# Largest payload the services accept (the server's max_payload is 1 MiB by default).
MAX_BODY = 64 * 1024


async def connect(url: str, name: str, *, connect_timeout_s: float = 30.0) -> Client:
    """Connect, retrying with backoff for up to ``connect_timeout_s``; reconnect forever after.
    ``url`` may list a cluster's nodes, comma-separated (``NATS_URL=nats://a:4222,nats://b:4222``)."""

    async def _cb_err(e: Exception) -> None:
        log.warning("nats error", extra=kv(error=str(e)))

    # credentials and TLS of this kind of process (shared/natsauth.py); never logged
    auth = natsauth.from_env(service=natsauth.service_of(name)).connect_options()

    async for attempt in retrying(
        stop_after_delay(connect_timeout_s), (OSError, NoServersError, asyncio.TimeoutError)
    ):
        with attempt:
            # nats-py retries a failed *first* connect forever when reconnects are unbounded,
            # so each try is bounded here and tenacity does the backing off.
            return await asyncio.wait_for(
                nats.connect(
                    [u.strip() for u in url.split(",") if u.strip()],  # a cluster: every seed URL
                    name=name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    error_cb=_cb_err,
                    connect_timeout=2,
                    **auth,
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
    """JetStream publish with retry (``attempts`` and at least :data:`PUBLISH_WINDOW_S` while no stream
    answers); ``msg_id`` makes retries idempotent (dedupe window)."""
    body = msg if isinstance(msg, bytes) else contracts.encode(msg)
    hdrs = dict(headers or {})
    if msg_id:
        hdrs["Nats-Msg-Id"] = msg_id
    stop = stop_after_attempt(attempts) & stop_after_delay(PUBLISH_WINDOW_S)
    async for attempt in retrying(stop, NOT_STORED, multiplier=0.05):
        with attempt:
            return await js.publish(subject, body, headers=hdrs or None)
    raise RuntimeError("unreachable")


class Stored(NamedTuple):
    """One stored message as a direct get returns it, with its JetStream timestamp (server time)."""

    subject: str
    seq: int
    data: bytes
    ts: float


async def direct_get(nc: Client, stream: str, *, timeout_s: float = 5.0, **query: object) -> Stored | None:
    """One stored message through ``$JS.API.DIRECT.GET.<stream>`` (the stream needs ``allow_direct``),
    e.g. ``last_by_subj=subject`` or ``seq=n, next_by_subj=subject``; None when there is none."""
    msg = await nc.request(f"$JS.API.DIRECT.GET.{stream}", json.dumps(query).encode(), timeout=timeout_s)
    headers = msg.headers or {}
    status = headers.get("Status")
    if status == "404":
        return None
    if status:
        raise RuntimeError(f"direct get {stream} {query}: {status} {headers.get('Description', '')}".strip())
    return Stored(headers["Nats-Subject"], int(headers["Nats-Sequence"]), msg.data, parse_ts(headers["Nats-Time-Stamp"]))


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


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout_s: float = 1.0) -> list[Msg]:
    """Up to ``batch`` messages, ``[]`` when idle. nats-py's ``fetch`` can stall past its own
    timeout, so it is bounded from outside too; a NATS error (a reconnect under way) is logged
    and answered with ``[]`` after a short pause, for the caller's loop to try again."""
    try:
        return await asyncio.wait_for(sub.fetch(batch, timeout=timeout_s), timeout=timeout_s + 5.0)
    except TimeoutError:  # asyncio's, nats' TimeoutError and FetchTimeoutError alike
        return []
    except nats.errors.Error as exc:
        log.warning("fetch failed", extra=kv(error=repr(exc)))
        await asyncio.sleep(0.5)
        return []


async def ack(msgs: list[Msg]) -> None:
    """Ack each message; one already acked, or an ack lost to NATS, only means a redelivery."""
    for m in msgs:
        try:
            await m.ack()
        except MsgAlreadyAckdError:
            pass
        except nats.errors.Error as exc:
            log.debug("ack failed", extra=kv(error=repr(exc)))


async def nak(msgs: list[Msg], delay: float = 1.0) -> None:
    """Return each message for redelivery after ``delay`` seconds."""
    for m in msgs:
        try:
            await m.nak(delay=delay)
        except MsgAlreadyAckdError:
            pass
        except nats.errors.Error as exc:
            log.debug("nak failed", extra=kv(error=repr(exc)))


async def read_subject(js: JetStreamContext, subject: str, *, stream: str | None = None) -> list[Msg]:
    """Every message stored on ``subject`` (wildcards allowed), in stream order, each with its
    ``metadata.sequence.stream``. An ephemeral no-ack consumer reads until nothing is pending;
    ``stream`` is looked up from the subject when not given."""
    cfg = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                         filter_subject=subject, inactive_threshold=60.0, mem_storage=True)
    sub = await js.pull_subscribe(subject, durable=None, stream=stream, config=cfg)
    out: list[Msg] = []
    try:
        remaining = (await sub.consumer_info()).num_pending or 0
        idle = 0
        while remaining > 0:
            msgs = await fetch(sub, min(remaining, 1000))
            if not msgs:
                idle += 1
                if idle > 30:
                    raise RuntimeError(f"reading {subject} stalled with {remaining} messages left")
                continue
            idle = 0
            for m in msgs:
                remaining = m.metadata.num_pending
                out.append(m)
    finally:
        try:
            await sub.unsubscribe()
        except Exception as exc:  # the ephemeral consumer goes away by itself (inactive_threshold)
            log.debug("unsubscribe failed", extra=kv(error=repr(exc)))
    return out


async def replay(js: JetStreamContext, subject: str, union: Any, *, stream: str | None = None) -> list[Any]:
    """Every stored event on ``subject``, in stream order, decoded as ``union`` (a bad one raises
    :class:`~shared.contracts.ContractError`). For sequences too, use :func:`read_subject`."""
    return [contracts.decode_event(m.data, union) for m in await read_subject(js, subject, stream=stream)]
