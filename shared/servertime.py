"""Server time: lease expiry is judged on nats-server's clock, never on a host's wall clock.

Two sources, both JetStream's own:

* every stored message's timestamp (``Nats-Time-Stamp`` on a direct get, the ack
  metadata of a consumed message), parsed by :func:`parse_ts`;
* a cheap probe for "now": the ``ts`` field nats-server puts in every
  ``$JS.API.STREAM.INFO.<stream>`` response (measured on nats-server 2.15: ~0.3 ms, the
  server's clock when it answered).

:class:`ServerClock` turns a probe into a **lower bound** of the server's current time:
the probe's ``ts`` was taken before the reply reached us, so ``ts + (monotonic now -
monotonic at receipt)`` never runs ahead of the server (up to clock-rate drift, ppm over
the at most ``max_age_s`` a probe is reused). A lower bound errs the safe way for
fencing: a lease is never judged expired before the server says so, and a decision that
relied on "expired" stays true when its append lands later. Any stored timestamp we read
is also a lower bound and only ever raises it (:meth:`ServerClock.observe`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime

from nats.aio.client import Client

_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_ts(value: str) -> float:
    """RFC 3339 with up to nanoseconds (Go's format, e.g. ``2026-11-30T01:43:52.022527382Z``)
    to seconds since the epoch."""
    m = _TS.match(value.strip())
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    head, frac, zone = m.groups()
    whole = datetime.fromisoformat(head + ("+00:00" if zone == "Z" else zone))
    if whole.tzinfo is None:  # pragma: no cover - the regex always gives a zone
        whole = whole.replace(tzinfo=UTC)
    return whole.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


class ServerClock:
    """A lower bound of nats-server's current time, probed at most every ``max_age_s``."""

    def __init__(self, nc: Client, stream: str, *, max_age_s: float = 1.0, timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.subject = f"$JS.API.STREAM.INFO.{stream}"
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self._base: float | None = None  # server time of the last probe
        self._mono = 0.0  # our monotonic clock when its reply arrived
        self._floor = 0.0  # the latest stored timestamp seen
        self._probing: asyncio.Future[None] | None = None

    def observe(self, ts: float) -> None:
        """A stored message's timestamp: the server's clock was at least there."""
        self._floor = max(self._floor, ts)

    async def now(self) -> float:
        if self._base is None or time.monotonic() - self._mono > self.max_age_s:
            await self._probe()
        assert self._base is not None
        return max(self._floor, self._base + (time.monotonic() - self._mono))

    async def _probe(self) -> None:
        # One probe at a time; concurrent callers share it.
        if self._probing is not None:
            await asyncio.shield(self._probing)
            return
        self._probing = asyncio.get_running_loop().create_future()
        try:
            msg = await self.nc.request(self.subject, b"", timeout=self.timeout_s)
            received = time.monotonic()
            body = json.loads(msg.data)
            if "ts" not in body:
                raise RuntimeError(f"{self.subject}: no server time in the reply: {msg.data[:200]!r}")
            self._base, self._mono = parse_ts(body["ts"]), received
            self._probing.set_result(None)
        except asyncio.CancelledError:
            self._probing.cancel()
            raise
        except Exception as exc:
            self._probing.set_exception(exc)
            self._probing.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self._probing = None
