"""One job's role: asked with ``role.request``, kept alive with ``role.renew``, given back with ``role.release``.

:func:`acquire` asks for the role (retrying while no allocator answers) and returns the
:class:`LeaseKeeper` of a grant; ``async with keeper.kept():`` renews it for the job's life and
releases it at the end.

The grant's lease lives ``lease_s`` from its grant event's JetStream timestamp, which is
after the job sent its request. So, on the job's own monotonic clock (no wall clock, no
clock sync), the lease surely lives until ``sent + lease_s``, where ``sent`` is when the
request that granted or last renewed it was sent. :class:`LeaseKeeper` renews every
``lease_s / 3``, retries transient failures (no allocator answering, a timeout, a busy
allocator) until that deadline minus a small margin, and reports the lease lost

* at once on a refusal (``superseded``, ``expired``, ``unknown``): the role is no
  longer this job's;
* when the deadline comes with no successful renewal: it cannot know the lease still
  lives, so it must stop speaking as if it did not.

:meth:`LeaseKeeper.valid` is what the speaker checks before every turn it publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from nats.aio.client import Client
from nats.errors import Error as NatsError
from tenacity import stop_after_delay

from shared import bus, contracts, subjects
from shared.log import kv

log = logging.getLogger("worker.lease")

REFUSALS = frozenset({"superseded", "expired", "unknown"})


# Refusals that say nothing about the role, only that the allocator could not decide now
# (services/allocator: "allocator error: <exception>", "busy: ..."): asked again, not obeyed.
# Measured: while a NATS cluster elects a new leader its reads time out for a few seconds; a job
# that left on "allocator error: TimeoutError" left its peer waiting for the join deadline.
TRANSIENT = ("allocator error", "busy")


class _Transient(Exception):
    def __init__(self, reply: contracts.RoleReply) -> None:
        self.reply = reply


async def request_role(nc: Client, req: contracts.RoleRequest, *, within_s: float = 20.0) -> contracts.RoleReply:
    """``role.request`` with retry while no allocator answers (one may be restarting) or it answers
    that it could not decide now (:data:`TRANSIENT`); asking again is safe, a grant is per job."""
    try:
        async for attempt in bus.retrying(stop_after_delay(within_s), (*bus.NO_ANSWER, _Transient)):
            with attempt:
                msg = await nc.request(subjects.ROLE_REQUEST, contracts.encode(req), timeout=3)
                reply = contracts.decode(msg.data, contracts.RoleReply)
                if not reply.granted and (reply.reason or "").startswith(TRANSIENT):
                    raise _Transient(reply)
                return reply
    except _Transient as exc:
        return exc.reply
    raise RuntimeError("unreachable")


async def acquire(nc: Client, req: contracts.RoleRequest, default_lease_s: float) -> LeaseKeeper | str:
    """The grant's keeper, or why there is none (denied; a grant without a token cannot be renewed)."""
    asked_at = time.monotonic()  # the lease surely lives lease_s from here
    reply = await request_role(nc, req)
    if reply.granted and reply.lease is None:
        log.error("grant without a lease token: cannot renew it, leaving", extra=kv(job_id=req.job_id, room=req.room))
        return "grant without a lease token"
    if not reply.granted or reply.role is None or reply.lease is None:
        return str(reply.reason)
    return LeaseKeeper(nc, room=req.room, job_id=req.job_id, role=reply.role, lease=reply.lease,
                       lease_s=reply.lease_s or default_lease_s, sent_at=asked_at)


class LeaseKeeper:
    def __init__(
        self,
        nc: Client,
        *,
        room: str,
        job_id: str,
        role: contracts.Role,
        lease: int,
        lease_s: float,
        sent_at: float,
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sent_at``: the ``clock()`` reading taken just before the granting request was sent."""
        self.nc = nc
        self.role = role
        self.renew_msg = contracts.RoleRenew(room=room, job_id=job_id, role=role, lease=lease)
        self.lease = lease
        self.lease_s = lease_s
        self.clock = clock
        # Stop a little before the deadline: a turn published now must be stored before it.
        self.margin_s = min(1.0, lease_s / 10)
        self.valid_until = sent_at + lease_s
        self.lost: str | None = None
        self.renewals = 0
        self._on_lost = on_lost

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` when the lease is lost (at once if it already is)."""
        self._on_lost = callback
        if self.lost is not None:
            callback(self.lost)

    def valid(self) -> bool:
        return self.lost is None and self.clock() < self.valid_until - self.margin_s

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.warning("lease lost", extra=kv(room=self.renew_msg.room, role=self.renew_msg.role,
                                               lease=self.lease, reason=reason))
            if self._on_lost is not None:
                self._on_lost(reason)

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[LeaseKeeper]:
        """Renew for the life of the block, then give the role back (else the lease expires)."""
        renewing = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            renewing.cancel()
            try:
                await self.nc.request(subjects.ROLE_RELEASE, contracts.encode(contracts.RoleRelease(
                    room=self.renew_msg.room, job_id=self.renew_msg.job_id)), timeout=3)
            except Exception as exc:
                log.warning("role release failed (the lease will expire)", extra=kv(error=str(exc)))

    async def run(self) -> None:
        """Renew until cancelled or lost."""
        while self.lost is None:
            await asyncio.sleep(max(0.0, min(self.lease_s / 3, self.valid_until - self.margin_s - self.clock())))
            await self.renew_once()

    async def renew_once(self) -> None:
        """One renewal, retried on transient failures until the lease's deadline."""
        delay = 0.05
        last_error = "no renewal"
        while self.lost is None:
            left = self.valid_until - self.margin_s - self.clock()
            if left <= 0:
                self._lose(f"not renewed in time ({last_error})")
                return
            sent = self.clock()
            try:
                msg = await self.nc.request(subjects.ROLE_RENEW, contracts.encode(self.renew_msg),
                                            timeout=min(3.0, left))
                reply = contracts.decode(msg.data, contracts.RenewReply)
            except (NatsError, TimeoutError, contracts.ContractError) as exc:  # nats' timeouts and no responders included
                last_error = f"{type(exc).__name__}: {exc}".strip(": ")
            else:
                if reply.renewed:
                    self.valid_until = sent + (reply.lease_s or self.lease_s)
                    self.renewals += 1
                    return
                if reply.reason in REFUSALS or reply.field is not None:
                    self._lose(reply.reason or f"bad renew: {reply.field}")
                    return
                last_error = reply.reason or "refused without a reason"  # busy / allocator error: retry
            left = self.valid_until - self.margin_s - self.clock()
            await asyncio.sleep(max(0.0, min(delay, left)))
            delay = min(delay * 2, 1.0)
