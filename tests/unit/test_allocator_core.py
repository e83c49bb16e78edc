"""The allocator's pure rules: lease_state, decide, decide_release (no NATS)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.allocator import core
from shared.contracts import LeaseEvent, ReleaseReply, Role, RoleRelease, RoleReply, RoleRequest

LEASE = 30.0


def req(job: str, prefer: Role | None = None, room: str = "r1") -> RoleRequest:
    return RoleRequest(room=room, job_id=job, identity=f"agent-{job}", prefer=prefer)


def ev(kind: str, role: Role, job: str, expires_at: float, at: float = 0.0) -> LeaseEvent:
    return LeaseEvent(kind=kind, room="r1", role=role, job_id=job, identity=f"agent-{job}",  # type: ignore[arg-type]
                      expires_at=expires_at, at=at)


def st_(last: LeaseEvent | None, now: float) -> core.RoleState:
    return core.lease_state(last, now)


def test_lease_state_folds_the_last_event() -> None:
    assert core.lease_state(None, 5.0) == core.FREE
    assert core.lease_state(ev("granted", "customer", "a", 10.0), 5.0).status == "held"
    assert core.lease_state(ev("renewed", "customer", "a", 10.0), 10.0).status == "expired"
    released = core.lease_state(ev("released", "customer", "a", 5.0), 1.0)
    assert released.status == "free" and released.holder is None
    assert core.lease_state(ev("granted", "support", "b", 10.0), 1.0).holder == "b"


def test_first_job_gets_customer_then_support_then_room_full() -> None:
    d = core.decide(req("a"), core.FREE, core.FREE, 100.0, LEASE)
    assert d.outcome == "granted" and d.reply == RoleReply(granted=True, role="customer", lease_s=LEASE)
    assert d.event == LeaseEvent(kind="granted", room="r1", role="customer", job_id="a", identity="agent-a",
                                 expires_at=130.0, at=100.0)
    cust = st_(d.event, 101.0)
    d2 = core.decide(req("b"), cust, core.FREE, 101.0, LEASE)
    assert d2.reply.role == "support" and d2.event is not None and d2.event.role == "support"
    sup = st_(d2.event, 102.0)
    d3 = core.decide(req("c"), cust, sup, 102.0, LEASE)
    assert d3 == core.Decision(reply=RoleReply(granted=False, reason=core.ROOM_FULL), outcome="denied")


def test_prefer_is_honoured_when_free_and_falls_back_otherwise() -> None:
    d = core.decide(req("a", prefer="support"), core.FREE, core.FREE, 0.0, LEASE)
    assert d.reply.role == "support"
    held_support = st_(d.event, 1.0)
    d2 = core.decide(req("b", prefer="support"), core.FREE, held_support, 1.0, LEASE)
    assert d2.reply.role == "customer"


def test_repeated_request_is_the_same_answer_and_renews() -> None:
    cust = st_(ev("granted", "customer", "a", 130.0, at=100.0), 110.0)
    d = core.decide(req("a", prefer="support"), cust, core.FREE, 110.0, LEASE)
    assert d.outcome == "renewed" and d.reply == RoleReply(granted=True, role="customer", lease_s=LEASE)
    assert d.event is not None and d.event.kind == "renewed" and d.event.expires_at == 140.0


def test_expired_lease_is_taken_over_but_its_holder_may_reclaim_it_first() -> None:
    expired = st_(ev("granted", "customer", "a", 10.0), 20.0)
    sup = st_(ev("granted", "support", "b", 50.0), 20.0)
    taken = core.decide(req("c"), expired, sup, 20.0, LEASE)
    assert taken.reply.role == "customer" and taken.took_over_expired and taken.outcome == "granted"
    # the late holder, before anyone took it over, keeps its role (never switches roles)
    again = core.decide(req("a", prefer="support"), expired, core.FREE, 20.0, LEASE)
    assert again.reply.role == "customer" and again.outcome == "renewed"
    # after the take-over the late holder is denied
    now_c = st_(taken.event, 21.0)
    assert core.decide(req("a"), now_c, sup, 21.0, LEASE).reply.granted is False


def test_release_frees_the_role_only_for_its_holder() -> None:
    cust = st_(ev("granted", "customer", "a", 130.0), 100.0)
    d = core.decide_release(RoleRelease(room="r1", job_id="a"), cust, core.FREE, 105.0)
    assert d.reply == ReleaseReply(released=True, role="customer")
    assert d.event is not None and d.event.kind == "released" and d.event.identity == "agent-a"
    after = st_(d.event, 106.0)
    assert after.status == "free"
    again = core.decide_release(RoleRelease(room="r1", job_id="a"), after, core.FREE, 106.0)
    assert again.reply == ReleaseReply(released=False, role="customer", reason=core.ALREADY_RELEASED)
    assert again.event is None
    other = core.decide_release(RoleRelease(room="r1", job_id="zz"), cust, core.FREE, 106.0)
    assert other.reply == ReleaseReply(released=False, reason=core.NOT_HOLDING) and other.event is None
    # a released role goes to the next job
    assert core.decide(req("c"), after, core.FREE, 107.0, LEASE).reply.role == "customer"


JOBS = ["a", "b", "c", "d"]
op = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(JOBS), st.sampled_from([None, "customer", "support"])),
    st.tuples(st.just("release"), st.sampled_from(JOBS), st.none()),
    st.tuples(st.just("wait"), st.none(), st.sampled_from([1.0, 10.0, 40.0])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=40))
def test_sequential_fold_never_gives_a_role_twice_or_a_job_two_roles(ops: list[tuple[str, str | None, object]]) -> None:
    logs: dict[Role, LeaseEvent | None] = {"customer": None, "support": None}
    now = 1000.0
    for kind, job, arg in ops:
        now += 0.5
        if kind == "wait":
            now += float(arg)  # type: ignore[arg-type]
            continue
        assert job is not None
        c, s = core.lease_state(logs["customer"], now), core.lease_state(logs["support"], now)
        before = core.held_by(job, c, s)
        if kind == "request":
            d = core.decide(req(job, prefer=arg), c, s, now, LEASE)  # type: ignore[arg-type]
            if before is not None:
                assert d.reply.role == before  # same answer while it holds the role
            if d.reply.granted:
                assert d.event is not None and d.event.role == d.reply.role
                other = s if d.reply.role == "customer" else c
                assert other.holder != job  # never two roles
                target = c if d.reply.role == "customer" else s
                assert target.status != "held" or target.holder == job  # never a live lease of another
            else:
                assert c.status == "held" and s.status == "held" and job not in (c.holder, s.holder)
            event = d.event
        else:
            r = core.decide_release(RoleRelease(room="r1", job_id=job), c, s, now)
            assert r.reply.released == (before is not None)
            event = r.event
        if event is not None:
            logs[event.role] = event
        c2, s2 = core.lease_state(logs["customer"], now), core.lease_state(logs["support"], now)
        assert c2.holder is None or c2.holder != s2.holder
