"""Role allocation rules: pure functions of a room's lease state. No I/O, no clock.

A room has one lease log per role (``roles.<room>.customer``, ``roles.<room>.support``).
Every :class:`~shared.contracts.LeaseEvent` carries the whole lease, so the state of a
role is a fold of its log that the last event alone determines (:func:`lease_state`).
Given both roles' states, :func:`decide` answers a ``role.request`` and says which event
(if any) must be appended; :func:`decide_release` does the same for ``role.release``.
The entrypoint (``main``) reads the states, calls these, and appends the event only if
the room's log has not moved since it read it, so every decision here is made on a
consistent snapshot of the room.

Rules:
- a job that holds a role (live lease, or expired and not yet taken over) gets that
  same role again, and the lease is renewed: a repeated request *is* the renewal;
- otherwise the preferred role if it is free or expired, else the other one
  (customer first by default); an expired lease of another job is taken over;
- otherwise the request is denied: the room is full;
- a job never holds two roles: its own role is checked before any free one.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.contracts import (
    ROLES,
    LeaseEvent,
    ReleaseReply,
    Role,
    RoleRelease,
    RoleReply,
    RoleRequest,
)

LeaseStatus = Literal["free", "held", "expired"]
Outcome = Literal["granted", "renewed", "denied"]

ROOM_FULL = "room full"
NOT_HOLDING = "not holding a role in this room"
ALREADY_RELEASED = "already released"


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
    """The answer to a role request, and the event to append (to ``roles.<room>.<event.role>``)."""

    reply: RoleReply
    outcome: Outcome
    event: LeaseEvent | None = None
    took_over_expired: bool = False  # the granted role was another job's expired lease


class ReleaseDecision(msgspec.Struct, frozen=True):
    reply: ReleaseReply
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


def decide(
    request: RoleRequest, customer: RoleState, support: RoleState, now: float, lease_s: float
) -> Decision:
    states = {"customer": customer, "support": support}
    own = held_by(request.job_id, customer, support)
    if own is not None:
        return Decision(
            reply=RoleReply(granted=True, role=own, lease_s=lease_s),
            outcome="renewed",
            event=_lease("renewed", request, own, now, lease_s),
        )
    order: tuple[Role, Role] = (request.prefer, _other(request.prefer)) if request.prefer else ROLES
    for role in order:
        state = states[role]
        if state.status != "held":
            return Decision(
                reply=RoleReply(granted=True, role=role, lease_s=lease_s),
                outcome="granted",
                event=_lease("granted", request, role, now, lease_s),
                took_over_expired=state.status == "expired",
            )
    return Decision(reply=RoleReply(granted=False, reason=ROOM_FULL), outcome="denied")


def decide_release(release: RoleRelease, customer: RoleState, support: RoleState, now: float) -> ReleaseDecision:
    own = held_by(release.job_id, customer, support)
    if own is not None:
        lease = (customer if own == "customer" else support).last
        assert lease is not None
        event = LeaseEvent(
            kind="released", room=release.room, role=own, job_id=release.job_id,
            identity=lease.identity, expires_at=now, at=now,
        )
        return ReleaseDecision(ReleaseReply(released=True, role=own), event)
    for role, state in zip(ROLES, (customer, support), strict=True):
        last = state.last
        if last is not None and last.kind == "released" and last.job_id == release.job_id:
            return ReleaseDecision(ReleaseReply(released=False, role=role, reason=ALREADY_RELEASED))
    return ReleaseDecision(ReleaseReply(released=False, reason=NOT_HOLDING))


def _lease(kind: Literal["granted", "renewed"], request: RoleRequest, role: Role, now: float, lease_s: float) -> LeaseEvent:
    return LeaseEvent(
        kind=kind, room=request.room, role=role, job_id=request.job_id,
        identity=request.identity, expires_at=now + lease_s, at=now,
    )
