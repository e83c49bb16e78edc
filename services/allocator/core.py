"""Role allocation rules: pure functions of a room's lease state. No I/O, no clock.

A room has one lease log per role (``roles.<room>.customer``, ``roles.<room>.support``).
Every :class:`~shared.contracts.LeaseEvent` carries the whole lease, so the state of a
role is a fold of its log that the last event alone determines (:func:`lease_state`).
Given both roles' states, :func:`decide` answers a ``role.request`` and says which event
(if any) must be appended; :func:`decide_release` does the same for ``role.release``.
The entrypoint (``main``) reads the states, calls these, and appends the event only if
the room's log has not moved since it read it, so every decision here is made on a
consistent snapshot of the room.

Rules (fenced leases):
- a grant is a lease whose token is the stream sequence of its grant event; every later
  event of that lease (renewals, the release) carries the token in ``lease``;
- time is server time: a lease ends at its latest event's JetStream timestamp plus that
  event's ``lease_s`` (:func:`stamp` normalises a stored event to that), and ``now`` is
  a lower bound of nats-server's clock (shared.servertime);
- a job holding a live lease gets the same answer again (same role, same token), and the
  request extends it (kept for old clients that renew by asking again);
- a job whose lease ended (expired, released, or taken over) is *fenced*: it is denied
  and never gets a role in that room again. Fenced job ids travel in every event of the
  room (``fenced``) because the log keeps only the last few events of a role;
- otherwise the preferred role if it is free or expired, else the other one (customer
  first by default); an expired lease of another job is taken over and its job fenced;
- otherwise the request is denied: the room is full;
- ``role.renew`` (:func:`decide_renew`) extends exactly the named live lease and never
  grants: a token of a lease that was taken over is ``superseded``, an ended one
  ``expired``, anything else ``unknown``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.contracts import (
    ROLES,
    LeaseEvent,
    ReleaseReply,
    RenewReply,
    Role,
    RoleRelease,
    RoleRenew,
    RoleReply,
    RoleRequest,
    stamp,  # noqa: F401  (re-exported: the rule that reads a stored event lives with LeaseEvent)
)

LeaseStatus = Literal["free", "held", "expired"]
Outcome = Literal["granted", "renewed", "denied"]
RenewOutcome = Literal["renewed", "superseded", "expired", "unknown"]

ROOM_FULL = "room full"
LEASE_ENDED = "lease ended: this job's lease in this room expired, was released or was taken over"
NOT_HOLDING = "not holding a role in this room"
ALREADY_RELEASED = "already released"
SUPERSEDED: RenewOutcome = "superseded"
EXPIRED: RenewOutcome = "expired"
UNKNOWN: RenewOutcome = "unknown"
# Bound on the fenced job ids carried in a room's events (a room sees a handful of jobs).
MAX_FENCED = 64


class RoleState(msgspec.Struct, frozen=True):
    """One role of one room: ``free`` (never granted or released), ``held`` or ``expired``."""

    status: LeaseStatus
    last: LeaseEvent | None = None

    @property
    def holder(self) -> str | None:
        """The job holding the lease (live or expired), or None when free."""
        if self.status == "free" or self.last is None:
            return None
        return self.last.job_id


FREE = RoleState("free")


def lease_state(last: LeaseEvent | None, now: float) -> RoleState:
    """Fold of a role's log: its last event decides (each event carries the whole lease)."""
    if last is None:
        return FREE
    if last.kind == "released":
        return RoleState("free", last)
    return RoleState("held" if now < last.expires_at else "expired", last)


class Decision(msgspec.Struct, frozen=True):
    """The answer to a role request, and the event to append (to ``roles.<room>.<event.role>``).

    A fresh grant's token is the sequence its event gets when stored: the entrypoint fills
    ``reply.lease`` in after the append."""

    reply: RoleReply
    outcome: Outcome
    event: LeaseEvent | None = None
    took_over_expired: bool = False  # the granted role was another job's expired lease


class ReleaseDecision(msgspec.Struct, frozen=True):
    reply: ReleaseReply
    event: LeaseEvent | None = None


class RenewDecision(msgspec.Struct, frozen=True):
    reply: RenewReply
    outcome: RenewOutcome
    event: LeaseEvent | None = None


def _other(role: Role) -> Role:
    return "support" if role == "customer" else "customer"


def held_by(job_id: str, customer: RoleState, support: RoleState) -> Role | None:
    """The role ``job_id`` holds in the room (live or expired, not taken over), if any."""
    # A live lease wins over an expired one; with room-wide optimistic writes a job never
    # holds both, but the log is data and we read it defensively.
    mine = [(s.status == "held", r) for r, s in zip(ROLES, (customer, support), strict=True) if s.holder == job_id]
    if not mine:
        return None
    return max(mine, key=lambda m: m[0])[1]


def fenced_jobs(customer: RoleState, support: RoleState) -> tuple[str, ...]:
    """Jobs that may never hold a role in this room again (carried in both roles' events)."""
    seen: dict[str, None] = {}
    for state in (customer, support):
        if state.last is not None:
            seen.update(dict.fromkeys(state.last.fenced))
    return tuple(seen)


def _fence(fenced: tuple[str, ...], *jobs: str) -> tuple[str, ...]:
    out = dict.fromkeys(fenced)
    out.update(dict.fromkeys(j for j in jobs if j))
    return tuple(out)[-MAX_FENCED:]


def decide(
    request: RoleRequest, customer: RoleState, support: RoleState, now: float, lease_s: float
) -> Decision:
    states = {"customer": customer, "support": support}
    fenced = fenced_jobs(customer, support)
    own = held_by(request.job_id, customer, support)
    if own is not None and states[own].status == "held":
        last = states[own].last
        assert last is not None
        return Decision(
            reply=RoleReply(granted=True, role=own, lease_s=lease_s, lease=last.lease),
            outcome="renewed",
            event=_lease("renewed", request.room, own, request.job_id, last.identity, now, lease_s,
                         fenced, lease=last.lease),
        )
    if own is not None or request.job_id in fenced:
        # Its lease ended (expired: not renewed in time; or released; or taken over): a
        # fenced job never gets a role here again, least of all the other one.
        return Decision(reply=RoleReply(granted=False, reason=LEASE_ENDED), outcome="denied")
    order: tuple[Role, Role] = (request.prefer, _other(request.prefer)) if request.prefer else ROLES
    for role in order:
        state = states[role]
        if state.status != "held":
            taken = state.status == "expired"
            return Decision(
                reply=RoleReply(granted=True, role=role, lease_s=lease_s),
                outcome="granted",
                event=_lease("granted", request.room, role, request.job_id, request.identity, now, lease_s,
                             _fence(fenced, state.holder or "") if taken else fenced),
                took_over_expired=taken,
            )
    return Decision(reply=RoleReply(granted=False, reason=ROOM_FULL), outcome="denied")


def decide_renew(renew: RoleRenew, customer: RoleState, support: RoleState, now: float, lease_s: float) -> RenewDecision:
    """Extend exactly lease ``renew.lease`` of ``renew.role`` if it is the live lease of that job."""
    state = customer if renew.role == "customer" else support
    last = state.last
    if last is not None and last.lease == renew.lease and last.job_id == renew.job_id:
        if state.status != "held":  # expired, or released: a lease is never revived
            return RenewDecision(RenewReply(renewed=False, reason=EXPIRED), EXPIRED)
        event = _lease("renewed", renew.room, renew.role, renew.job_id, last.identity, now, lease_s,
                       fenced_jobs(customer, support), lease=renew.lease)
        return RenewDecision(RenewReply(renewed=True, lease_s=lease_s), "renewed", event)
    if last is not None and last.lease is not None and renew.lease < last.lease \
            and renew.job_id in fenced_jobs(customer, support):
        # the role was granted again since this token's grant, and this job lost it
        return RenewDecision(RenewReply(renewed=False, reason=SUPERSEDED), SUPERSEDED)
    return RenewDecision(RenewReply(renewed=False, reason=UNKNOWN), UNKNOWN)


def decide_release(release: RoleRelease, customer: RoleState, support: RoleState, now: float) -> ReleaseDecision:
    own = held_by(release.job_id, customer, support)
    if own is not None:
        lease = (customer if own == "customer" else support).last
        assert lease is not None
        event = LeaseEvent(
            kind="released", room=release.room, role=own, job_id=release.job_id,
            identity=lease.identity, expires_at=now, at=now, lease=lease.lease, lease_s=0.0,
            fenced=_fence(fenced_jobs(customer, support), release.job_id),
        )
        return ReleaseDecision(ReleaseReply(released=True, role=own), event)
    for role, state in zip(ROLES, (customer, support), strict=True):
        last = state.last
        if last is not None and last.kind == "released" and last.job_id == release.job_id:
            return ReleaseDecision(ReleaseReply(released=False, role=role, reason=ALREADY_RELEASED))
    return ReleaseDecision(ReleaseReply(released=False, reason=NOT_HOLDING))


def _lease(
    kind: Literal["granted", "renewed"], room: str, role: Role, job_id: str, identity: str, now: float,
    lease_s: float, fenced: tuple[str, ...], *, lease: int | None = None,
) -> LeaseEvent:
    return LeaseEvent(
        kind=kind, room=room, role=role, job_id=job_id, identity=identity,
        expires_at=now + lease_s, at=now, lease=lease, lease_s=lease_s, fenced=fenced,
    )
