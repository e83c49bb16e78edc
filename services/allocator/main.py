"""Allocator entrypoint: wires ``role.request`` / ``role.release`` to the pure core.

The only state is the ROLES stream. Per request: read a consistent snapshot of the
room (the last event across ``roles.<room>.*``, then the other role's last event),
let :mod:`services.allocator.core` decide, and append the decided event with
``Nats-Expected-Last-Subject-Sequence`` scoped to the whole room
(``...-Subject: roles.<room>.*``). If anyone wrote to the room in between (another
instance, another job, or our own retried write that already landed) the append
fails with 10071 and we read and decide again. Scoping the check to the room, not to
one role, is what keeps a job from ending up with both roles when two of its requests
race a release. Instances share the load through a queue group and share nothing else.

Time is the server's: each stored event is read with its JetStream timestamp (direct get,
``Nats-Time-Stamp``) and its lease ends that long after it (core.stamp); "now" is a lower
bound of nats-server's clock from :class:`shared.servertime.ServerClock` (the ``ts`` of a
STREAM.INFO reply, extrapolated on our monotonic clock for at most a second). No
allocator host's wall clock takes part, so hosts with skewed clocks agree on expiry.
A grant's lease token is the stream sequence its append got (the PubAck), which is also
what any reader derives from the stored grant.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import APIError
from prometheus_client import Counter

from services.allocator import core
from shared import bus, contracts, subjects
from shared.config import Settings
from shared.log import kv
from shared.metrics import AllocatorMetrics
from shared.servertime import ServerClock
from shared.streams import ROLES as ROLES_STREAM

log = logging.getLogger(__name__)

M = TypeVar("M", contracts.RoleRequest, contracts.RoleRelease, contracts.RoleRenew)
R = TypeVar("R", contracts.RoleReply, contracts.ReleaseReply, contracts.RenewReply)

EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"

# Each failed append means another writer to the same room succeeded, so a room with
# a handful of contenders settles in a few rounds; this bound only stops a runaway.
MAX_ATTEMPTS = 32
# Fields a bad request can name (bounded metric label).
REQUEST_FIELDS = frozenset({"room", "job_id", "identity", "prefer", "role", "lease", "$"})
BUSY = "busy: too many concurrent writes to this room, retry"


class Busy(Exception):
    pass


class Snapshot(NamedTuple):
    """Both roles' last events as of one instant, and the room's last sequence then."""

    customer: contracts.LeaseEvent | None
    support: contracts.LeaseEvent | None
    seq: int


class Allocator:
    """One allocator instance on one NATS connection; start as many as you like."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        lease_s: float,
        metrics: AllocatorMetrics,
        server_clock: ServerClock | None = None,
        max_in_flight: int = 512,
        timeout_s: float = 5.0,
    ) -> None:
        self.nc, self.js = nc, js
        self.lease_s = lease_s
        self.metrics = metrics
        self.server_clock = server_clock or ServerClock(nc, str(ROLES_STREAM.name), timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        # The handler table: subject -> handler of the raw body, returning the reply.
        self.handlers: dict[str, Callable[[bytes], Awaitable[contracts.Struct]]] = {
            subjects.ROLE_REQUEST: self.handle_request,
            subjects.ROLE_RELEASE: self.handle_release,
            subjects.ROLE_RENEW: self.handle_renew,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for subject, handler in self.handlers.items():
            sub = await self.nc.subscribe(subject, queue=subjects.ALLOCATOR_QUEUE, cb=self._dispatcher(handler))
            self._subs.append(sub)
        await self.nc.flush()

    async def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop taking requests and finish (or, after ``grace_s``, abandon) those in flight."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed: nothing to unsubscribe from
                pass
        self._subs.clear()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _dispatcher(self, handler: Callable[[bytes], Awaitable[contracts.Struct]]) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            # Bounded concurrency: waiting here leaves further messages queued in the client.
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(handler, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_msg

    async def _serve(self, handler: Callable[[bytes], Awaitable[contracts.Struct]], msg: Msg) -> None:
        try:
            reply = await handler(msg.data)
            if msg.reply:
                await msg.respond(contracts.encode(reply))
        except Exception:
            log.exception("reply failed", extra=kv(subject=msg.subject))
        finally:
            self._slots.release()

    # ------------------------------------------------------------------ handlers

    async def handle_request(self, data: bytes) -> contracts.RoleReply:
        refuse = partial(contracts.RoleReply, granted=False)
        errors = self.metrics.grants.labels("none", "error")
        return await self._handle(data, contracts.RoleRequest, "request", self._timed_allocate, refuse, errors)

    async def handle_release(self, data: bytes) -> contracts.ReleaseReply:
        refuse = partial(contracts.ReleaseReply, released=False)
        errors = self.metrics.releases.labels("error")
        return await self._handle(data, contracts.RoleRelease, "release", self._counted_release, refuse, errors)

    async def handle_renew(self, data: bytes) -> contracts.RenewReply:
        refuse = partial(contracts.RenewReply, renewed=False)
        errors = self.metrics.renewals.labels("error")
        return await self._handle(data, contracts.RoleRenew, "renew", self.renew, refuse, errors)

    async def _handle(
        self,
        data: bytes,
        typ: type[M],
        what: str,
        act: Callable[[M], Awaitable[R]],
        refuse: Callable[..., R],
        errors: Counter,
    ) -> R:
        """Decode ``data`` as ``typ`` and ``act`` on it; a bad body, a busy room or a failure is
        refused (``refuse``), counted in ``errors`` and logged as "bad role <what>" / "role <what> failed"."""
        try:
            msg = contracts.decode(data, typ, max_bytes=bus.MAX_BODY)
        except contracts.ContractError as exc:
            self.metrics.bad_requests.labels(exc.field if exc.field in REQUEST_FIELDS else "$").inc()
            errors.inc()
            log.info(f"bad role {what}", extra=kv(field=exc.field, reason=exc.reason))
            return refuse(field=exc.field, reason=exc.reason)
        try:
            return await act(msg)
        except Busy:
            errors.inc()
            return refuse(reason=BUSY)
        except Exception as exc:
            errors.inc()
            log.exception(f"role {what} failed", extra=kv(room=msg.room, job_id=msg.job_id))
            return refuse(reason=f"allocator error: {type(exc).__name__}")

    async def _timed_allocate(self, request: contracts.RoleRequest) -> contracts.RoleReply:
        with self.metrics.request_seconds.time():
            return await self.allocate(request)

    async def _counted_release(self, release: contracts.RoleRelease) -> contracts.ReleaseReply:
        reply = await self.release(release)
        self.metrics.releases.labels("released" if reply.released else "not_held").inc()
        return reply

    async def server_now(self) -> float:
        return await self.server_clock.now()

    async def renew(self, renew: contracts.RoleRenew) -> contracts.RenewReply:
        def rule(c: core.RoleState, s: core.RoleState, now: float) -> core.RenewDecision:
            return core.decide_renew(renew, c, s, now, self.lease_s)

        decision: core.RenewDecision
        decision, _ = await self._transact(renew.room, rule)
        self.metrics.renewals.labels(decision.outcome).inc()
        if decision.outcome != "renewed":
            log.info("renew refused", extra=kv(room=renew.room, job_id=renew.job_id, role=renew.role,
                                               lease=renew.lease, reason=decision.outcome))
        return decision.reply

    async def allocate(self, request: contracts.RoleRequest) -> contracts.RoleReply:
        def rule(c: core.RoleState, s: core.RoleState, now: float) -> core.Decision:
            return core.decide(request, c, s, now, self.lease_s)

        decision: core.Decision
        decision, seq = await self._transact(request.room, rule)
        if decision.outcome == "granted":
            # the token of a fresh lease is the sequence its grant event was stored at
            decision = msgspec.structs.replace(decision, reply=msgspec.structs.replace(decision.reply, lease=seq))
        role = decision.reply.role or "none"
        self.metrics.grants.labels(role, decision.outcome).inc()
        if decision.took_over_expired and decision.reply.role:
            self.metrics.lease_expiries.labels(decision.reply.role).inc()
        if decision.outcome != "renewed":
            log.info(
                "role " + decision.outcome,
                extra=kv(room=request.room, job_id=request.job_id, role=decision.reply.role,
                         lease=decision.reply.lease, took_over_expired=decision.took_over_expired),
            )
        return decision.reply

    async def release(self, release: contracts.RoleRelease) -> contracts.ReleaseReply:
        def rule(c: core.RoleState, s: core.RoleState, now: float) -> core.ReleaseDecision:
            return core.decide_release(release, c, s, now)

        decision: core.ReleaseDecision
        decision, _ = await self._transact(release.room, rule)
        log.info("role release", extra=kv(room=release.room, job_id=release.job_id,
                                         released=decision.reply.released, role=decision.reply.role))
        return decision.reply

    # ------------------------------------------------------------------ event log

    async def _transact(
        self, room: str, rule: Callable[[core.RoleState, core.RoleState, float], Any]
    ) -> tuple[Any, int | None]:
        """Read the room, decide, append with the room's expected sequence; again on conflict.

        Returns the decision and the sequence its event was stored at (None: nothing written).
        ``now`` is read *after* the snapshot: a lower bound of server time that is still true
        when the append lands, so "expired" stays true (and a renewal accepted as "live" was
        live when it was judged)."""
        for attempt in range(MAX_ATTEMPTS):
            if attempt > 1:
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            snap = await self.snapshot(room)
            if snap is None:  # the room moved while we read it
                self.metrics.conflicts.inc()
                continue
            now = await self.server_now()
            decision = rule(core.lease_state(snap.customer, now), core.lease_state(snap.support, now), now)
            if decision.event is None:
                return decision, None
            seq = await self._append(room, decision.event, snap.seq)
            if seq is not None:
                return decision, seq
            self.metrics.conflicts.inc()
        raise Busy

    async def snapshot(self, room: str) -> Snapshot | None:
        """Both roles as of one instant, or None if the room changed while we read.

        The last message across ``roles.<room>.*`` has the room's last sequence L. Every
        other role log is then read; if one has moved past L, the two reads do not
        describe one instant. Otherwise they describe the room as of the first read, and
        an append expecting L succeeds only if nothing was written since.
        """
        last = await self._direct_last(subjects.role_room(room))
        if last is None:
            return Snapshot(None, None, 0)
        events: dict[contracts.Role, contracts.LeaseEvent | None] = {}
        for role in contracts.ROLES:
            subject = subjects.role_lease(room, role)
            stored = last if last.subject == subject else await self._direct_last(subject)
            if stored is not None and stored.seq > last.seq:
                return None
            events[role] = _lease_event(stored) if stored is not None else None
            if stored is not None:
                self.server_clock.observe(stored.ts)
        return Snapshot(events["customer"], events["support"], last.seq)

    async def _append(self, room: str, event: contracts.LeaseEvent, expected_seq: int) -> int | None:
        """The event's stream sequence, or None if the room moved since ``expected_seq``."""
        try:
            ack = await bus.publish(
                self.js,
                subjects.role_lease(room, event.role),
                event,
                headers={EXPECTED_SEQ: str(expected_seq), EXPECTED_SEQ_SUBJECT: subjects.role_room(room)},
                attempts=3,
            )
        except APIError as exc:
            if bus.is_wrong_last_sequence(exc):
                return None
            raise
        return ack.seq

    async def _direct_last(self, subject: str) -> bus.Stored | None:
        """Last message on ``subject`` (wildcards allowed) via the stream's direct get."""
        return await bus.direct_get(self.nc, str(ROLES_STREAM.name), timeout_s=self.timeout_s, last_by_subj=subject)


def _lease_event(stored: bus.Stored) -> contracts.LeaseEvent | None:
    """Decode a stored lease, stamped with its token and server-time expiry (core.stamp);
    anything else on a role subject is treated as no lease."""
    try:
        event = contracts.decode(stored.data, contracts.LeaseEvent)
    except contracts.ContractError as exc:
        log.warning("unreadable lease event ignored",
                    extra=kv(subject=stored.subject, seq=stored.seq, field=exc.field, reason=exc.reason))
        return None
    if stored.subject != f"{subjects.ROLES_PREFIX}.{event.room}.{event.role}":
        log.warning("lease event on the wrong subject ignored", extra=kv(subject=stored.subject, seq=stored.seq))
        return None
    return core.stamp(event, stored.seq, stored.ts)


async def run(settings: Settings, stop: asyncio.Event, *, metrics: AllocatorMetrics | None = None) -> None:
    """Serve until ``stop`` is set: connect, ensure streams, subscribe, then drain."""
    nc = await bus.connect(settings.nats_url, "crosstalk-allocator")
    js = await bus.jetstream(nc)
    allocator = Allocator(nc, js, lease_s=settings.lease_s, metrics=metrics or AllocatorMetrics())
    await allocator.start()
    log.info("ready", extra=kv(lease_s=settings.lease_s, queue=subjects.ALLOCATOR_QUEUE))
    await stop.wait()
    log.info("stopping")
    await allocator.stop()
    await nc.drain()
