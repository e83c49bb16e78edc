"""Is a turn's lease the one the allocator's log shows for its role, in its room, at its time?

A turn (``TurnRecorded``) carries ``room``, ``role`` and ``lease`` (the token: the ROLES
stream sequence of the grant). It is stored only if, at the turn's own JetStream
timestamp ``T`` (server time, the same clock the lease log is stamped with), lease
``L`` was the live lease of ``roles.<room>.<role>``:

* the first event at or after sequence ``L`` on that subject belongs to ``L`` (the grant
  itself, or one of its renewals if the log already dropped the grant: it keeps 16
  events a role), else ``unknown``;
* no event of another lease on that subject is stamped at or before ``T`` (a takeover),
  else ``superseded``; no release of ``L`` at or before ``T``, else ``released``;
* ``T`` is before the end of ``L``: the latest expiry of its events (each renewal was
  accepted by the allocator while ``L`` lived, so the events of one lease form one
  unbroken interval), else ``expired``.

The allocator guarantees that a lease's events are contiguous on its subject (once
another job holds the role, the old token is never renewed), so reading forward from
``L`` up to the first foreign event says everything about ``L``.

Pure part: :class:`LeaseView` (what is known of one token) and :func:`verdict`. I/O
part: :class:`LeaseLog`, direct gets on ROLES (``allow_direct``: no consumer, served by
any replica) with a bounded cache per token. A view is *complete until* a server time
``H`` when every ROLES event stamped at or before ``H`` has been read: ``H`` is the
newest timestamp among the conversation messages in hand, all stored before we read
the log (one server, one clock; in a cluster, direct gets may be answered by a replica
that lags, and stream leaders' clocks may differ by their skew). A view that met a
foreign event or its release is complete for good. So a turn costs at most a direct get
or two the first time its token is seen and usually none after.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from dataclasses import replace as _replace
from typing import Literal

from nats.aio.client import Client

from shared import bus, contracts, subjects
from shared.contracts import ContractError, LeaseEvent, Role, TurnRecorded, stamp
from shared.streams import ROLES

log = logging.getLogger("sink.fencing")

Refusal = Literal["no_lease", "unknown", "superseded", "released", "expired"]
REFUSALS: tuple[Refusal, ...] = ("no_lease", "unknown", "superseded", "released", "expired")
INF = float("inf")


@dataclass(frozen=True)
class Mark:
    """One event of a role's lease log, as fencing reads it."""

    seq: int
    ts: float  # JetStream timestamp (server time)
    lease: int | None
    kind: str
    expires: float  # server time (shared.contracts.stamp)


@dataclass(frozen=True)
class LeaseView:
    """What is known of token ``lease`` on ``roles.<room>.<role>``."""

    room: str
    role: Role
    lease: int
    found: bool = True  # the first event at or after ``lease`` is one of this lease's
    marks: tuple[Mark, ...] = ()  # its events in order, then at most one foreign event
    last_seq: int = 0  # read up to this stream sequence
    complete_until: float = -INF  # every event stamped at or before this has been read

    @property
    def closed(self) -> bool:
        """Nothing later can matter: the lease was released or another lease followed."""
        return bool(self.marks) and (self.marks[-1].lease != self.lease or self.marks[-1].kind == "released")

    def knows(self, ts: float) -> bool:
        return not self.found or self.closed or ts <= self.complete_until


def extend(view: LeaseView, mark: Mark) -> LeaseView:
    if view.closed:
        return view
    return _replace(view, marks=(*view.marks, mark), last_seq=max(view.last_seq, mark.seq))


def verdict(view: LeaseView, ts: float) -> Refusal | None:
    """None if ``view.lease`` was the live lease at server time ``ts`` (``view.knows(ts)``)."""
    if not view.found:
        return "unknown"
    live_until = -INF
    for m in view.marks:
        if m.lease != view.lease:
            if m.ts <= ts:
                return "superseded"
            break
        if m.kind == "released":
            if m.ts <= ts:
                return "released"
            break
        live_until = max(live_until, m.expires)
    return None if ts < live_until else "expired"


class LeaseLog:
    """Judges turns against the ROLES stream (direct gets), caching one view per token."""

    def __init__(self, nc: Client, *, max_views: int = 50_000, timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.max_views = max_views
        self.timeout_s = timeout_s
        self._views: OrderedDict[tuple[str, str, int], LeaseView] = OrderedDict()

    async def check(self, turn: TurnRecorded, ts: float, horizon: float) -> Refusal | None:
        """Refusal reason for ``turn`` stored at server time ``ts``, or None to store it.

        ``horizon`` (>= ``ts``): the newest timestamp among messages already received.
        Raises on transient failures (the caller retries the message later)."""
        if turn.lease is None or turn.room is None or not contracts.is_token(turn.room):
            return "no_lease"
        key = (turn.room, turn.role, turn.lease)
        view = self._views.get(key)
        if view is None:
            view = await self._open(turn.room, turn.role, turn.lease)
        if not view.knows(ts):
            view = await self._read_on(view, max(ts, horizon))
        self._views[key] = view
        self._views.move_to_end(key)
        while len(self._views) > self.max_views:
            self._views.popitem(last=False)
        return verdict(view, ts)

    async def _open(self, room: str, role: Role, lease: int) -> LeaseView:
        view = LeaseView(room=room, role=role, lease=lease)
        first = await self._next(subjects.role_lease(room, role), lease)
        if first is None or first.lease != lease:
            return _replace(view, found=False)
        return extend(view, first)

    async def _read_on(self, view: LeaseView, horizon: float) -> LeaseView:
        subject = subjects.role_lease(view.room, view.role)
        while not view.closed:
            mark = await self._next(subject, view.last_seq + 1)
            if mark is None:
                break
            view = extend(view, mark)
        return _replace(view, complete_until=max(view.complete_until, horizon))

    async def _next(self, subject: str, seq: int) -> Mark | None:
        """The first event on ``subject`` at or after ``seq``."""
        stored = await bus.direct_get(self.nc, str(ROLES.name), timeout_s=self.timeout_s, seq=seq, next_by_subj=subject)
        if stored is None:
            return None
        try:
            event = stamp(contracts.decode(stored.data, LeaseEvent), stored.seq, stored.ts)
        except ContractError as exc:  # not a lease: it cannot vouch for any token
            log.warning("unreadable lease event", extra={"subject": subject, "seq": stored.seq, "reason": str(exc)})
            return Mark(seq=stored.seq, ts=stored.ts, lease=None, kind="unreadable", expires=stored.ts)
        return Mark(seq=stored.seq, ts=stored.ts, lease=event.lease, kind=event.kind, expires=event.expires_at)
