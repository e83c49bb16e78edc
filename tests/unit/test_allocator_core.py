"""The allocator's pure rules: lease_state, decide, decide_release (no NATS)."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from services.allocator import core
from shared import contracts as wire

LEASE = 30.0


def req(job: str, prefer: wire.Role | None = None, room: str = "r1") -> wire.RoleRequest:
    return wire.RoleRequest(room=room, job_id=job, identity=f"agent-{job}", prefer=prefer)


def ev(kind: str, role: wire.Role, job: str, expires_at: float, at: float = 0.0, lease: int = 1,
       fenced: tuple[str, ...] = ()) -> wire.LeaseEvent:
    """An event as the rules read it (stamped: token filled in, expiry on server time)."""
    return wire.LeaseEvent(kind=kind, room="r1", role=role, job_id=job, identity=f"agent-{job}",  # type: ignore[arg-type]
                      expires_at=expires_at, at=at, lease=lease, fenced=fenced)


def st_(last: wire.LeaseEvent | None, now: float) -> core.RoleState:
    return core.lease_state(last, now)


def stored(event: wire.LeaseEvent | None, seq: int, ts: float) -> wire.LeaseEvent:
    """What the entrypoint reads back after appending ``event`` at ``seq`` with timestamp ``ts``."""
    assert event is not None
    return core.stamp(event, seq, ts)


def test_lease_state_folds_the_last_event() -> None:
    assert core.lease_state(None, 5.0) == core.FREE
    assert core.lease_state(ev("granted", "customer", "a", 10.0), 5.0).status == "held"
    assert core.lease_state(ev("renewed", "customer", "a", 10.0), 10.0).status == "expired"
    released = core.lease_state(ev("released", "customer", "a", 5.0), 1.0)
    assert released.status == "free" and released.holder is None
    assert core.lease_state(ev("granted", "support", "b", 10.0), 1.0).holder == "b"


def test_stamp_takes_the_token_and_the_expiry_from_the_stored_message() -> None:
    d = core.decide(req("a"), core.FREE, core.FREE, 100.0, LEASE)
    assert d.event is not None and d.event.lease is None and d.event.lease_s == LEASE
    # The allocator's "now" was 100; the server stored it at 100.004 as sequence 17.
    got = stored(d.event, 17, 100.004)
    assert got.lease == 17 and got.expires_at == 100.004 + LEASE
    # a renewal keeps the token it carries; a release ends the lease at its own timestamp
    assert stored(msgspec.structs.replace(d.event, kind="renewed", lease=17), 40, 120.0).lease == 17
    assert stored(msgspec.structs.replace(d.event, kind="released", lease=17), 41, 125.0).expires_at == 125.0
    # an event written before lease_s existed keeps its duration expires_at - at
    old = wire.LeaseEvent(kind="granted", room="r1", role="customer", job_id="a", identity="i", expires_at=130.0, at=100.0)
    assert stored(old, 5, 500.0).expires_at == 530.0 and stored(old, 5, 500.0).lease == 5


def test_expiry_is_judged_on_server_timestamps_not_the_writer_clock() -> None:
    # An allocator whose clock runs 1 h ahead wrote at=3700, expires_at=3730: only the
    # stored timestamp (server time 100) and the duration count.
    skewed = wire.LeaseEvent(kind="granted", room="r1", role="customer", job_id="a", identity="i",
                        expires_at=3730.0, at=3700.0, lease_s=LEASE)
    s = stored(skewed, 3, 100.0)
    assert core.lease_state(s, 129.9).status == "held"
    assert core.lease_state(s, 130.0).status == "expired"
    taken = core.decide(req("b"), core.lease_state(s, 131.0), core.FREE, 131.0, LEASE)
    assert taken.reply.role == "customer" and taken.took_over_expired


def test_first_job_gets_customer_then_support_then_room_full() -> None:
    d = core.decide(req("a"), core.FREE, core.FREE, 100.0, LEASE)
    assert d.outcome == "granted" and d.reply == wire.RoleReply(granted=True, role="customer", lease_s=LEASE)
    assert d.event == wire.LeaseEvent(kind="granted", room="r1", role="customer", job_id="a", identity="agent-a",
                                 expires_at=130.0, at=100.0, lease_s=LEASE)
    cust = st_(stored(d.event, 1, 100.0), 101.0)
    d2 = core.decide(req("b"), cust, core.FREE, 101.0, LEASE)
    assert d2.reply.role == "support" and d2.event is not None and d2.event.role == "support"
    sup = st_(stored(d2.event, 2, 101.0), 102.0)
    d3 = core.decide(req("c"), cust, sup, 102.0, LEASE)
    assert d3 == core.Decision(reply=wire.RoleReply(granted=False, reason=core.ROOM_FULL), outcome="denied")


def test_prefer_is_honoured_when_free_and_falls_back_otherwise() -> None:
    d = core.decide(req("a", prefer="support"), core.FREE, core.FREE, 0.0, LEASE)
    assert d.reply.role == "support"
    held_support = st_(stored(d.event, 1, 0.0), 1.0)
    d2 = core.decide(req("b", prefer="support"), core.FREE, held_support, 1.0, LEASE)
    assert d2.reply.role == "customer"


def test_repeated_request_is_the_same_answer_same_token_and_renews() -> None:
    cust = st_(ev("granted", "customer", "a", 130.0, at=100.0, lease=7), 110.0)
    d = core.decide(req("a", prefer="support"), cust, core.FREE, 110.0, LEASE)
    assert d.outcome == "renewed" and d.reply == wire.RoleReply(granted=True, role="customer", lease_s=LEASE, lease=7)
    assert d.event is not None and d.event.kind == "renewed" and d.event.expires_at == 140.0
    assert d.event.lease == 7  # the renewal belongs to the same lease


def test_expired_lease_is_taken_over_and_its_holder_is_fenced_for_good() -> None:
    expired = st_(ev("granted", "customer", "a", 10.0, lease=1), 20.0)
    sup = st_(ev("granted", "support", "b", 50.0, lease=2), 20.0)
    # the late holder, even before anyone took its role, is denied: a lease is never revived
    late = core.decide(req("a", prefer="support"), expired, core.FREE, 20.0, LEASE)
    assert late == core.Decision(reply=wire.RoleReply(granted=False, reason=core.LEASE_ENDED), outcome="denied")
    taken = core.decide(req("c"), expired, sup, 20.0, LEASE)
    assert taken.reply.role == "customer" and taken.took_over_expired and taken.outcome == "granted"
    assert taken.event is not None and taken.event.fenced == ("a",)
    # after the take-over the late holder is denied, and never given the other role either
    now_c = st_(stored(taken.event, 3, 20.0), 21.0)
    assert core.decide(req("a"), now_c, sup, 21.0, LEASE).reply.granted is False
    assert core.decide(req("a", prefer="support"), now_c, core.FREE, 21.0, LEASE).reply == wire.RoleReply(
        granted=False, reason=core.LEASE_ENDED)
    # the fence survives the other role's log moving on and c's own renewals (carried forward)
    renewed = core.decide(req("c"), now_c, core.FREE, 22.0, LEASE)
    assert renewed.event is not None and renewed.event.fenced == ("a",)
    d = core.decide(req("d"), st_(stored(renewed.event, 4, 22.0), 23.0), core.FREE, 23.0, LEASE)
    assert d.reply.role == "support" and d.event is not None and d.event.fenced == ("a",)
    # even when the only surviving events are ones that never mention a (log truncated)
    only_support = st_(stored(d.event, 5, 23.0), 24.0)
    assert core.decide(req("a"), core.FREE, only_support, 24.0, LEASE).reply.granted is False


def test_renew_extends_exactly_the_live_lease_and_never_grants() -> None:
    cust = st_(ev("granted", "customer", "a", 130.0, at=100.0, lease=7), 110.0)
    ok = core.decide_renew(wire.RoleRenew(room="r1", job_id="a", role="customer", lease=7), cust, core.FREE, 110.0, LEASE)
    assert ok.outcome == "renewed" and ok.reply == wire.RenewReply(renewed=True, lease_s=LEASE)
    assert ok.event is not None and (ok.event.kind, ok.event.lease, ok.event.role) == ("renewed", 7, "customer")
    # wrong token, wrong role, another job, no lease at all: unknown, nothing written
    for bad in (wire.RoleRenew(room="r1", job_id="a", role="customer", lease=8),
                wire.RoleRenew(room="r1", job_id="a", role="support", lease=7),
                wire.RoleRenew(room="r1", job_id="b", role="customer", lease=7)):
        d = core.decide_renew(bad, cust, core.FREE, 110.0, LEASE)
        assert d == core.RenewDecision(wire.RenewReply(renewed=False, reason="unknown"), "unknown"), bad
    # a free room: renew never grants
    d = core.decide_renew(wire.RoleRenew(room="r1", job_id="a", role="customer", lease=7), core.FREE, core.FREE,
                          110.0, LEASE)
    assert d.outcome == "unknown" and d.event is None


def test_renew_after_expiry_or_takeover_or_release_is_refused() -> None:
    r = wire.RoleRenew(room="r1", job_id="a", role="customer", lease=7)
    expired = st_(ev("renewed", "customer", "a", 130.0, lease=7), 130.0)
    assert core.decide_renew(r, expired, core.FREE, 130.0, LEASE).reply == wire.RenewReply(renewed=False,
                                                                                    reason="expired")
    taken = core.decide(req("b"), expired, core.FREE, 131.0, LEASE)
    assert taken.event is not None
    now_b = st_(stored(taken.event, 9, 131.0), 132.0)
    d = core.decide_renew(r, now_b, core.FREE, 132.0, LEASE)
    assert d == core.RenewDecision(wire.RenewReply(renewed=False, reason="superseded"), "superseded")
    # b's token works for b only
    assert core.decide_renew(wire.RoleRenew(room="r1", job_id="b", role="customer", lease=9), now_b, core.FREE,
                             132.0, LEASE).outcome == "renewed"
    # a released lease is over
    rel = core.decide_release(wire.RoleRelease(room="r1", job_id="b"), now_b, core.FREE, 133.0)
    assert rel.event is not None and rel.event.lease == 9 and "b" in rel.event.fenced
    after = st_(stored(rel.event, 10, 133.0), 134.0)
    assert core.decide_renew(wire.RoleRenew(room="r1", job_id="b", role="customer", lease=9), after, core.FREE,
                             134.0, LEASE).outcome == "expired"
    assert core.decide(req("b"), after, core.FREE, 134.0, LEASE).reply.granted is False  # released: fenced
    assert core.decide(req("c"), after, core.FREE, 134.0, LEASE).reply.role == "customer"


def test_release_frees_the_role_only_for_its_holder() -> None:
    cust = st_(ev("granted", "customer", "a", 130.0), 100.0)
    d = core.decide_release(wire.RoleRelease(room="r1", job_id="a"), cust, core.FREE, 105.0)
    assert d.reply == wire.ReleaseReply(released=True, role="customer")
    assert d.event is not None and d.event.kind == "released" and d.event.identity == "agent-a"
    after = st_(stored(d.event, 2, 105.0), 106.0)
    assert after.status == "free"
    again = core.decide_release(wire.RoleRelease(room="r1", job_id="a"), after, core.FREE, 106.0)
    assert again.reply == wire.ReleaseReply(released=False, role="customer", reason=core.ALREADY_RELEASED)
    assert again.event is None
    other = core.decide_release(wire.RoleRelease(room="r1", job_id="zz"), cust, core.FREE, 106.0)
    assert other.reply == wire.ReleaseReply(released=False, reason=core.NOT_HOLDING) and other.event is None
    # a released role goes to the next job
    assert core.decide(req("c"), after, core.FREE, 107.0, LEASE).reply.role == "customer"


JOBS = ["a", "b", "c", "d"]
op = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(JOBS), st.sampled_from([None, "customer", "support"])),
    st.tuples(st.just("renew"), st.sampled_from(JOBS), st.sampled_from(["customer", "support"])),
    st.tuples(st.just("release"), st.sampled_from(JOBS), st.none()),
    st.tuples(st.just("wait"), st.none(), st.sampled_from([1.0, 10.0, 40.0])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=40))
def test_sequential_fold_never_gives_a_role_twice_or_a_job_two_roles(ops: list[tuple[str, str | None, object]]) -> None:
    logs: dict[wire.Role, wire.LeaseEvent | None] = {"customer": None, "support": None}
    tokens: dict[str, tuple[wire.Role, int]] = {}  # the token each job was last told
    lost: set[str] = set()  # jobs whose lease ended: never a role again
    now, seq = 1000.0, 0
    for kind, job, arg in ops:
        now += 0.5
        if kind == "wait":
            now += float(arg)  # type: ignore[arg-type]
            continue
        assert job is not None
        c, s = core.lease_state(logs["customer"], now), core.lease_state(logs["support"], now)
        for state in (c, s):  # a job whose lease ended (expired, released, taken) is fenced
            if state.last is not None and state.status != "held":
                lost.add(state.last.job_id)
        before = core.held_by(job, c, s)
        event: wire.LeaseEvent | None
        if kind == "request":
            d = core.decide(req(job, prefer=arg), c, s, now, LEASE)  # type: ignore[arg-type]
            if before is not None and (c if before == "customer" else s).status == "held":
                assert d.reply.role == before and d.reply.lease == tokens[job][1]  # same answer while it lives
            if job in lost:
                assert not d.reply.granted
            if d.reply.granted:
                assert d.event is not None and d.event.role == d.reply.role
                other = s if d.reply.role == "customer" else c
                assert other.holder != job  # never two roles
                target = c if d.reply.role == "customer" else s
                assert target.status != "held" or target.holder == job  # never a live lease of another
            else:
                assert job in lost or (c.status == "held" and s.status == "held" and job not in (c.holder, s.holder))
            event = d.event
        elif kind == "renew":
            role, lease = tokens.get(job, (arg, 999))
            r = core.decide_renew(wire.RoleRenew(room="r1", job_id=job, role=role, lease=lease), c, s,  # type: ignore[arg-type]
                                  now, LEASE)
            target = c if role == "customer" else s
            assert r.reply.renewed == (target.status == "held" and target.holder == job
                                       and target.last is not None and target.last.lease == lease)
            assert r.event is None or (r.event.kind == "renewed" and r.event.job_id == job)
            if job in lost:
                assert r.reply.reason in ("expired", "superseded", "unknown")
            event = r.event
        else:
            rr = core.decide_release(wire.RoleRelease(room="r1", job_id=job), c, s, now)
            assert rr.reply.released == (before is not None)
            event = rr.event
            if event is not None:
                lost.add(job)
        if event is not None:
            seq += 1
            logs[event.role] = stored(event, seq, now + 0.001)  # the server stores it a moment later
            if event.kind == "granted":
                tokens[job] = (event.role, seq)
        c2, s2 = core.lease_state(logs["customer"], now), core.lease_state(logs["support"], now)
        assert c2.holder is None or c2.holder != s2.holder
