"""The room audit: livekit-server's view of each conversation room, joined with the
allocator's grant log. Pure, no I/O.

Facts come from two streams in any order: verified webhooks (:class:`RoomWebhook`,
``lk.room.<room>.<event>``) and lease events (``roles.<room>.<role>``). Each fact is
merged into a keyed set with commutative, idempotent merges (min/max, first non-empty),
and everything else (a participant's role, the violations) is recomputed from those
sets by :func:`judge`. So the result is the same whatever the interleaving of the two
streams, whatever the redeliveries, and after a restart that recovers the facts from
``batch.json``.

Violations, each with its evidence:

* ``two_of_one_role``: two participants hold one role at overlapping times (holding =
  in the room, as livekit-server reported it, while a grant of that role to that
  identity was live);
* ``no_grant``: an agent participant that never held a grant in that room;
* ``third_agent``: more than two distinct agent participants in one attempt's room.

Timestamps: ``joined_at`` is livekit's ``joinedAtMs``; ``left_at`` is the
``participant_left`` event's ``createdAt`` (whole seconds, server clock), so a
presence can look up to 1 s shorter than it was; grant times are the allocator's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from shared.contracts import LeaseEvent, RoomWebhook

AGENT = "agent"


class Participant(msgspec.Struct, frozen=True, kw_only=True):
    """A participant of one room as livekit-server reported it (one per participant sid)."""

    room: str
    attempt: int
    identity: str
    sid: str
    kind: str = ""
    role: str | None = None  # from the grant log (matched by identity); derived
    joined_at: float | None = None
    left_at: float | None = None


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """One job's hold of a role in one room, from the allocator's lease log."""

    room: str
    attempt: int
    role: str
    job_id: str
    identity: str
    lease: int | None = None  # stream sequence of its first grant event (the lease token)
    granted_at: float | None = None  # first ``granted``
    last_granted_at: float | None = None
    expires_at: float | None = None  # latest expiry granted or renewed
    released_at: float | None = None

    def until(self) -> float:
        """When the hold ended: released, else expired (open if neither is known)."""
        if self.released_at is not None and (self.last_granted_at is None or self.released_at >= self.last_granted_at):
            return self.released_at
        return self.expires_at if self.expires_at is not None else math.inf


class RoomSeen(msgspec.Struct, frozen=True, kw_only=True):
    room: str
    attempt: int
    sid: str = ""
    started_at: float | None = None
    finished_at: float | None = None


class Violation(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # two_of_one_role | no_grant | third_agent
    room: str
    attempt: int
    identities: list[str]
    role: str | None = None
    evidence: str = ""


# --------------------------------------------------------------------------- merges


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _imin(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _first(a: str, b: str) -> str:
    return a or b if a == "" or b == "" else min(a, b)


def add_webhook(
    participants: Iterable[Participant], rooms: Iterable[RoomSeen], ev: RoomWebhook, attempt: int
) -> tuple[list[Participant], list[RoomSeen]]:
    """The participant and room facts after ``ev`` (unchanged for what ``ev`` does not tell)."""
    ps = {(p.room, p.sid): p for p in participants}
    rs = {r.room: r for r in rooms}
    r = rs.get(ev.room, RoomSeen(room=ev.room, attempt=attempt))
    rs[ev.room] = msgspec.structs.replace(
        r,
        sid=_first(r.sid, ev.room_sid),
        started_at=_min(r.started_at, ev.at) if ev.event == "room_started" else r.started_at,
        finished_at=_max(r.finished_at, ev.at) if ev.event == "room_finished" else r.finished_at,
    )
    if ev.event in ("participant_joined", "participant_left") and ev.participant_sid and ev.identity:
        key = (ev.room, ev.participant_sid)
        p = ps.get(key, Participant(room=ev.room, attempt=attempt, identity=ev.identity, sid=ev.participant_sid))
        ps[key] = msgspec.structs.replace(
            p,
            kind=_first(p.kind, ev.kind or ""),
            joined_at=_min(p.joined_at, ev.joined_at),
            left_at=_min(p.left_at, ev.at) if ev.event == "participant_left" else p.left_at,
        )
    return _sorted_participants(ps.values()), sorted(rs.values(), key=lambda x: (x.attempt, x.room))


def add_lease(grants: Iterable[Grant], ev: LeaseEvent, attempt: int, seq: int | None) -> list[Grant]:
    """The grant facts after one lease event (``seq``: its stream sequence)."""
    gs = {(g.room, g.role, g.job_id): g for g in grants}
    key = (ev.room, ev.role, ev.job_id)
    g = gs.get(key, Grant(room=ev.room, attempt=attempt, role=ev.role, job_id=ev.job_id, identity=ev.identity))
    granted = ev.kind == "granted"
    gs[key] = msgspec.structs.replace(
        g,
        identity=_first(g.identity, ev.identity),
        lease=_imin(g.lease, seq) if granted else g.lease,
        granted_at=_min(g.granted_at, ev.at) if granted else g.granted_at,
        last_granted_at=_max(g.last_granted_at, ev.at) if granted else g.last_granted_at,
        expires_at=_max(g.expires_at, ev.expires_at) if ev.kind != "released" else g.expires_at,
        released_at=_max(g.released_at, ev.at) if ev.kind == "released" else g.released_at,
    )
    return sorted(gs.values(), key=lambda x: (x.attempt, x.room, x.role, x.granted_at or 0.0, x.job_id))


def _sorted_participants(ps: Iterable[Participant]) -> list[Participant]:
    return sorted(ps, key=lambda p: (p.attempt, p.room, p.joined_at or 0.0, p.identity, p.sid))


# --------------------------------------------------------------------------- judgement


def _fmt(t: float | None) -> str:
    return "open" if t is None or t == math.inf else f"{t:.3f}"


def judge(
    participants: Iterable[Participant], grants: Iterable[Grant]
) -> tuple[list[Participant], list[Violation]]:
    """Participants with their role from the grant log, and every violation found."""
    grants = list(grants)
    by_holder: dict[tuple[str, str], list[Grant]] = {}
    for g in grants:
        if g.granted_at is not None:
            by_holder.setdefault((g.room, g.identity), []).append(g)
    out: list[Participant] = []
    for p in participants:
        held = sorted(by_holder.get((p.room, p.identity), []), key=lambda g: (g.granted_at or 0.0, g.role))
        out.append(msgspec.structs.replace(p, role=held[0].role if held else None))
    out = _sorted_participants(out)
    violations: list[Violation] = []
    rooms: dict[str, list[Participant]] = {}
    for p in out:
        rooms.setdefault(p.room, []).append(p)
    for room, ps in sorted(rooms.items()):
        attempt = ps[0].attempt
        agents = [p for p in ps if p.kind == AGENT]
        for p in agents:
            if (room, p.identity) not in by_holder:
                violations.append(Violation(
                    kind="no_grant", room=room, attempt=attempt, identities=[p.identity],
                    evidence=f"agent {p.identity} ({p.sid}) in the room {_fmt(p.joined_at)}-{_fmt(p.left_at)} "
                             "with no grant of any role in this room"))
        agent_ids = sorted({p.identity for p in agents})
        if len(agent_ids) > 2:
            seen = ", ".join(f"{p.identity} joined {_fmt(p.joined_at)}" for p in agents)
            violations.append(Violation(
                kind="third_agent", room=room, attempt=attempt, identities=agent_ids,
                evidence=f"{len(agent_ids)} agent participants in one room: {seen}"))
        violations.extend(_two_of_one_role(room, attempt, ps, by_holder))
    return out, violations


def _holds(p: Participant, grants: list[Grant], role: str) -> list[tuple[float, float, Grant]]:
    """The times ``p`` held ``role``: in the room and under a live grant of that role."""
    start_p = p.joined_at if p.joined_at is not None else -math.inf
    end_p = p.left_at if p.left_at is not None else math.inf
    spans = []
    for g in grants:
        if g.role != role or g.granted_at is None:
            continue
        lo, hi = max(start_p, g.granted_at), min(end_p, g.until())
        if lo < hi:
            spans.append((lo, hi, g))
    return spans


def _two_of_one_role(
    room: str, attempt: int, ps: list[Participant], by_holder: dict[tuple[str, str], list[Grant]]
) -> list[Violation]:
    found: list[Violation] = []
    for role in ("customer", "support"):
        holders = [(p, _holds(p, by_holder.get((room, p.identity), []), role)) for p in ps]
        holders = [(p, s) for p, s in holders if s]
        reported: set[tuple[str, str]] = set()
        for i, (a, sa) in enumerate(holders):
            for b, sb in holders[i + 1:]:
                if a.identity == b.identity:
                    continue  # one identity reconnecting is one holder
                pair = (min(a.identity, b.identity), max(a.identity, b.identity))
                if pair in reported:
                    continue
                overlap = [(max(x[0], y[0]), min(x[1], y[1]), x[2], y[2]) for x in sa for y in sb
                           if max(x[0], y[0]) < min(x[1], y[1])]
                if not overlap:
                    continue
                reported.add(pair)
                lo, hi, ga, gb = overlap[0]
                found.append(Violation(
                    kind="two_of_one_role", room=room, attempt=attempt, identities=list(pair), role=role,
                    evidence=f"{a.identity} (job {ga.job_id}, lease {ga.lease}) and {b.identity} "
                             f"(job {gb.job_id}, lease {gb.lease}) both held {role} in the room "
                             f"from {_fmt(lo)} to {_fmt(hi)}"))
    return found


def summary(violations: Iterable[Violation]) -> dict[str, int]:
    """Violation counts by kind (every kind present, zero included)."""
    counts = {"two_of_one_role": 0, "no_grant": 0, "third_agent": 0}
    for v in violations:
        counts[v.kind] = counts.get(v.kind, 0) + 1
    return counts
