"""The CLI's NATS side: send ``batch.start`` and wait for the verdict; replay then follow a batch.

``watch_batch`` replays the batch's events from the BATCH_EVENTS stream (JetStream ordered
consumer, deliver all), then follows them live, and listens to the dispatcher's
``dispatcher.status`` for what waits on worker capacity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client

from cli import EXIT_UNAVAILABLE, CliExit
from cli.progress import BatchProgress, status_line
from cli.views import LineView, LiveView
from shared import bus, config, contracts, streams, subjects
from shared.contracts import BatchEvent, BatchReply, ContractError, DispatcherStatus

CONNECT_TIMEOUT_S = 5.0


def redact_url(url: str) -> str:
    """A NATS URL without credentials, fit for a message."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def connect(settings: config.Settings) -> Client:
    """Connect within CONNECT_TIMEOUT_S (shared.bus.connect: backoff, then reconnect as long as we run)."""
    # The CLI reports an unreachable server in one line of its own; bus's per-try warnings are for
    # the services' logs and would only repeat it here.
    logging.getLogger(bus.__name__).setLevel(logging.ERROR)
    try:
        return await bus.connect(settings.nats_url, "crosstalk-cli", connect_timeout_s=CONNECT_TIMEOUT_S)
    except Exception as exc:  # timed out, refused, bad credentials: all mean "not reachable"
        raise CliExit(
            EXIT_UNAVAILABLE,
            f"cannot reach NATS at {redact_url(settings.nats_url)} (NATS_URL) within {CONNECT_TIMEOUT_S:g}s: "
            f"{type(exc).__name__}",
        ) from None


async def request_start(settings: config.Settings, body: bytes, timeout: float) -> BatchReply:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError

    nc = await connect(settings)
    try:
        # The stream captures batch.start, so a command sent before any dispatcher runs is kept.
        await streams.ensure_streams(nc.jetstream(timeout=10))
        try:
            msg = await nc.request(subjects.BATCH_START, body, timeout=timeout)
        except (TimeoutError, NatsTimeoutError):
            raise CliExit(
                EXIT_UNAVAILABLE,
                f"no verdict from a dispatcher within {timeout:g}s. The command is stored in the "
                f"{streams.BATCH_CMDS.name} stream and runs when a dispatcher starts (`just up`, `just status`).",
            ) from None
        except NoRespondersError:
            raise CliExit(EXIT_UNAVAILABLE, "nothing answers batch.start: is the dispatcher running?") from None
        try:
            return contracts.decode(msg.data, BatchReply)
        except ContractError as exc:
            raise CliExit(EXIT_UNAVAILABLE, f"unexpected reply on batch.start: {exc}") from None
    finally:
        await nc.close()


async def watch_batch(
    settings: config.Settings,
    batch_id: str,
    *,
    wait_s: float,
    timeout_s: float | None,
    view_factory: Callable[[str], LiveView | LineView],
    clock: Callable[[], float] = time.time,
) -> BatchProgress:
    """Replay then follow ``batch.evt.<batch_id>`` until BatchFinished."""
    from nats.js.api import DeliverPolicy
    from nats.js.errors import NotFoundError

    subject = subjects.batch_events(batch_id)  # validates the id
    progress = BatchProgress(batch_id)
    nc = await connect(settings)
    view = None
    try:
        js = nc.jetstream(timeout=10)

        async def on_status(msg: Any) -> None:
            try:
                progress.apply_status(contracts.decode(msg.data, DispatcherStatus))
            except ContractError:
                pass

        await nc.subscribe(subjects.DISPATCHER_STATUS, cb=on_status)
        try:
            sub = await js.subscribe(
                subject, stream=streams.BATCH_EVENTS.name, ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL, idle_heartbeat=2.0,
            )
        except NotFoundError:
            raise CliExit(
                EXIT_UNAVAILABLE,
                f"stream {streams.BATCH_EVENTS.name} not found on {redact_url(settings.nats_url)}: "
                "has a dispatcher ever run there?",
            ) from None
        view = view_factory(batch_id)
        started = time.monotonic()
        seen_any = False
        while progress.finished is None:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise CliExit(EXIT_UNAVAILABLE, f"gave up after {timeout_s:g}s; {status_line(progress, clock())}")
            limit = 1.0 if seen_any else max(0.05, min(1.0, wait_s))
            try:
                msg = await sub.next_msg(timeout=limit)
            except TimeoutError:  # nats.errors.TimeoutError is a TimeoutError too
                if not seen_any and time.monotonic() - started >= wait_s:
                    raise CliExit(
                        EXIT_UNAVAILABLE,
                        f"no events for batch {batch_id} within {wait_s:g}s: unknown batch id, "
                        "or no dispatcher has taken it yet",
                    ) from None
                view.update(progress, clock(), caught_up=seen_any)
                continue
            seen_any = True
            try:
                progress.apply(contracts.decode_event(msg.data, BatchEvent))
            except ContractError:
                progress.ignored += 1  # an event kind this CLI does not know yet
            pending = msg.metadata.num_pending if msg.metadata else 0
            view.update(progress, clock(), caught_up=pending == 0)
        view.update(progress, clock(), caught_up=True)
        return progress
    finally:
        if view is not None:
            view.close()
        await nc.close()
