"""The room audit fold (services/sink/audit.py via core.audit_fact): roles from the grant
log, the three violations with evidence, and the same answer in every interleaving."""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.sink import audit, core
from services.sink.core import BatchDoc
from shared.contracts import LeaseEvent, RoomWebhook

BATCH = "b1"
CONV = "b1-00000"
ROOM = "b1-00000-a1"


def wh(event: str, identity: str | None = None, sid: str | None = None, *, at: float, kind: str = "agent",
       joined: float | None = None, room: str = ROOM, eid: str | None = None) -> RoomWebhook:
    participant = event.startswith("participant_")
    return RoomWebhook(
        event=event,  # type: ignore[arg-type]
        id=eid or f"EV_{event}_{identity}_{at}",
        room=room,
        room_sid="RM_1",
        identity=identity if participant else None,
        participant_sid=(sid or f"PA_{identity}") if participant else None,
        kind=kind if participant else None,
        joined_at=(joined if joined is not None else at) if participant else None,
        at=at,
        received_at=at + 0.01,
    )


def lease(kind: str, role: str, job: str, identity: str, *, at: float, expires: float,
          room: str = ROOM) -> LeaseEvent:
    return LeaseEvent(kind=kind, room=room, role=role, job_id=job, identity=identity,  # type: ignore[arg-type]
                      expires_at=expires, at=at)


def fold(facts: list[tuple[Any, int | None]], doc: BatchDoc | None = None) -> BatchDoc:
    doc = doc or BatchDoc(batch_id=BATCH)
    for fact, seq in facts:
        doc = core.audit_fact(doc, fact, seq)
    return doc


def normal_room() -> list[tuple[Any, int | None]]:
    return [
        (wh("room_started", at=100.0), None),
        (lease("granted", "customer", "AJ_c", "agent-AJ_c", at=101.0, expires=131.0), 7),
        (lease("granted", "support", "AJ_s", "agent-AJ_s", at=101.2, expires=131.2), 8),
        (wh("participant_joined", "agent-AJ_c", at=101.0, joined=100.9), None),
        (wh("participant_joined", "agent-AJ_s", at=101.0, joined=100.95), None),
        (lease("renewed", "customer", "AJ_c", "agent-AJ_c", at=110.0, expires=140.0), 9),
        (lease("released", "customer", "AJ_c", "agent-AJ_c", at=120.0, expires=140.0), 11),
        (lease("released", "support", "AJ_s", "agent-AJ_s", at=120.1, expires=131.2), 12),
        (wh("participant_left", "agent-AJ_c", at=121.0, joined=100.9), None),
        (wh("participant_left", "agent-AJ_s", at=121.0, joined=100.95), None),
        (wh("room_finished", at=122.0), None),
    ]


def test_a_normal_room_has_one_agent_of_each_role_and_no_violation() -> None:
    entry = fold(normal_room()).conversations[CONV]
    assert entry.violations == []
    assert [(p.identity, p.kind, p.role, p.joined_at, p.left_at, p.attempt, p.room) for p in entry.participants] == [
        ("agent-AJ_c", "agent", "customer", 100.9, 121.0, 1, ROOM),
        ("agent-AJ_s", "agent", "support", 100.95, 121.0, 1, ROOM),
    ]
    customer = next(g for g in entry.grants if g.role == "customer")
    assert (customer.lease, customer.granted_at, customer.expires_at, customer.released_at) == (7, 101.0, 140.0, 120.0)
    assert entry.rooms == [audit.RoomSeen(room=ROOM, attempt=1, sid="RM_1", started_at=100.0, finished_at=122.0)]
    # the conversation's other fields are untouched (the audit is additive)
    assert entry.outcome is None and entry.turns == 0


def test_an_agent_joined_by_hand_is_flagged_as_no_grant_and_third_agent() -> None:
    doc = fold([*normal_room()[:5], (wh("participant_joined", "intruder", at=105.0), None)])
    kinds = sorted(v.kind for v in doc.conversations[CONV].violations)
    assert kinds == ["no_grant", "third_agent"]
    no_grant = next(v for v in doc.conversations[CONV].violations if v.kind == "no_grant")
    assert no_grant.identities == ["intruder"] and "no grant" in no_grant.evidence and no_grant.room == ROOM
    third = next(v for v in doc.conversations[CONV].violations if v.kind == "third_agent")
    assert third.identities == ["agent-AJ_c", "agent-AJ_s", "intruder"]
    intruder = next(p for p in doc.conversations[CONV].participants if p.identity == "intruder")
    assert intruder.role is None and intruder.kind == "agent"


def test_a_standard_participant_needs_no_grant_and_is_no_third_agent() -> None:
    doc = fold([*normal_room()[:5], (wh("participant_joined", "observer", at=105.0, kind="standard"), None)])
    assert doc.conversations[CONV].violations == []


def test_two_live_grants_of_one_role_in_the_room_at_once_are_flagged() -> None:
    facts = [
        *normal_room()[:5],
        # a second job holds customer while the first one's lease is still live (expires 131)
        (lease("granted", "customer", "AJ_x", "agent-AJ_x", at=105.0, expires=135.0), 20),
        (wh("participant_joined", "agent-AJ_x", at=105.5, joined=105.5), None),
    ]
    violations = fold(facts).conversations[CONV].violations
    two = [v for v in violations if v.kind == "two_of_one_role"]
    assert len(two) == 1
    assert two[0].role == "customer" and two[0].identities == ["agent-AJ_c", "agent-AJ_x"]
    assert "105.500" in two[0].evidence and "131.000" in two[0].evidence and "lease 20" in two[0].evidence
    assert {v.kind for v in violations} == {"two_of_one_role", "third_agent"}


def test_a_takeover_after_the_lease_expired_and_the_holder_left_is_no_violation() -> None:
    facts = [
        (lease("granted", "customer", "AJ_c", "agent-AJ_c", at=101.0, expires=131.0), 7),
        (wh("participant_joined", "agent-AJ_c", at=101.0), None),
        (wh("participant_left", "agent-AJ_c", at=125.0, joined=101.0), None),
        (lease("granted", "customer", "AJ_y", "agent-AJ_y", at=132.0, expires=162.0), 30),
        (wh("participant_joined", "agent-AJ_y", at=132.5), None),
    ]
    assert fold(facts).conversations[CONV].violations == []


def test_rooms_of_other_batches_or_not_conversations_change_nothing() -> None:
    doc = BatchDoc(batch_id=BATCH)
    assert core.audit_fact(doc, wh("participant_joined", "x", at=1.0, room="b2-00000-a1")) is doc
    assert core.audit_fact(doc, wh("participant_joined", "x", at=1.0, room="some-room")) is doc
    assert core.audit_target("b1-x-00012-a3") == ("b1-x", "b1-x-00012", 3)


def test_a_redelivered_fact_changes_nothing() -> None:
    doc = fold(normal_room())
    for fact, seq in normal_room():
        assert core.audit_fact(doc, fact, seq) is doc


def test_every_interleaving_of_webhooks_and_grants_gives_the_same_audit() -> None:
    facts = [
        *normal_room()[1:5],
        (wh("participant_joined", "intruder", at=105.0), None),
        (lease("granted", "customer", "AJ_x", "agent-AJ_x", at=105.0, expires=135.0), 20),
        (wh("participant_joined", "agent-AJ_x", at=105.5), None),
    ]
    want = fold(facts)
    assert {v.kind for v in want.conversations[CONV].violations} == {"no_grant", "third_agent", "two_of_one_role"}
    for order in itertools.permutations(facts):
        assert fold(list(order)) == want


@settings(max_examples=200, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(min_value=0, max_value=3))
def test_any_order_with_redeliveries_and_a_restart_gives_the_same_audit(rng: random.Random, cut: int) -> None:
    facts = normal_room() + [(wh("participant_joined", "intruder", at=105.0), None)]
    want = fold(facts)
    shuffled = facts + rng.sample(facts, k=len(facts) // 2)  # redeliveries
    rng.shuffle(shuffled)
    # a "restart": the first part is written to batch.json and read back
    split = len(shuffled) * cut // 4
    recovered = core.decode_doc(core.encode_doc(fold(shuffled[:split])))
    assert fold(shuffled[split:], recovered) == want
