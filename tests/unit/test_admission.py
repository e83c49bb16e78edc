"""Admission by the workers' real capacity (issue 12): the pure parts, no I/O, no clock."""

from __future__ import annotations

import msgspec
import pytest
from support import dispatcher
from support.dispatcher import spec

from services.dispatcher import core
from services.dispatcher.state import BatchState, conversation_id, evolve, room_name
from shared import capacity, contracts, subjects
from shared.capacity import Capacity, Fleet
from shared.contracts import (
    BatchAccepted,
    BatchEvent,
    ContractError,
    ConversationDispatched,
    ConversationSettled,
    WorkerCapacity,
)
from shared.metrics import REASONS, reason_label

SETTINGS = dispatcher.settings(max_concurrency=200)


def accepted(n: int, concurrency: int, bid: str = "b1", at: float = 0.0) -> BatchState:
    state = evolve(None, BatchAccepted(spec=spec(n, concurrency, bid), at=at), 1)
    assert state is not None
    return state


def apply(state: BatchState, *events: BatchEvent) -> BatchState:
    for ev in events:
        new = evolve(state, ev, state.seq + 1)
        assert new is not None
        state = new
    return state


def admit_all(states: list[BatchState], cap: Capacity, now: float = 1.0) -> list[BatchState]:
    """Dispatch as long as plan_dispatch admits (capacity unchanged: nothing placed yet)."""
    while (ev := core.plan_dispatch(states, 1000, now, None, capacity=cap)) is not None:
        states = [apply(s, ev) if s.spec.batch_id == ev.batch_id else s for s in states]
    return states


def hb(worker_id: str, cap: int, rooms: tuple[str, ...] = (), *, agent: str = "crosstalk",
       closing: bool = False) -> WorkerCapacity:
    return capacity.heartbeat(worker_id=worker_id, agent_name=agent, capacity=cap, rooms=rooms, at=0.0,
                              closing=closing)


# --------------------------------------------------------------------------- admission


def test_no_worker_heartbeat_admits_nothing_the_batch_waits() -> None:
    state = accepted(10, 10)
    assert core.plan_dispatch([state], 200, 1.0, capacity=Capacity()) is None
    assert core.queued(state) == 10  # waiting, not failed
    assert core.on_tick(state, 1000.0, SETTINGS) == []  # queued time never reaches a deadline


def test_concurrency_is_an_upper_bound_two_sessions_per_conversation() -> None:
    # one worker of 4 sessions: 2 conversations, whatever the batch's concurrency
    states = admit_all([accepted(10, 10)], Capacity(workers=1, capacity=4, free=4))
    assert len(states[0].in_flight) == 2
    assert core.queued(states[0]) == 8
    # an odd free slot is not half a conversation
    states = admit_all([accepted(10, 10)], Capacity(workers=1, capacity=5, free=5))
    assert len(states[0].in_flight) == 2
    # and concurrency still bounds a batch below the capacity
    states = admit_all([accepted(10, 3)], Capacity(workers=2, capacity=32, free=32))
    assert len(states[0].in_flight) == 3 and core.queued(states[0]) == 0


def test_sessions_already_placed_are_not_reserved_twice() -> None:
    states = admit_all([accepted(10, 10)], Capacity(workers=1, capacity=8, free=8))
    rooms = sorted(states[0].convs[c].room for c in states[0].in_flight)
    assert len(rooms) == 4
    # both agents of the first two conversations now run: the worker reports 4 free and those rooms
    placed = {rooms[0]: 2, rooms[1]: 2}
    cap = Capacity(workers=1, capacity=8, free=4, placed=placed)
    assert core.reserved(states, cap) == 4  # the two unplaced conversations
    assert core.admissible(states, cap) == 0
    assert core.plan_dispatch(states, 200, 1.0, capacity=cap) is None
    # one agent of a third placed too: still nothing free for a new conversation
    cap = Capacity(workers=1, capacity=8, free=3, placed={**placed, rooms[2]: 1})
    assert core.reserved(states, cap) == 3 and core.admissible(states, cap) == 0
    # a second worker announces 16: eight more conversations
    cap = Capacity(workers=2, capacity=24, free=19, placed={**placed, rooms[2]: 1})
    assert core.admissible(states, cap) == 8


def test_capacity_is_shared_across_batches_fewest_in_flight_first() -> None:
    states = admit_all([accepted(10, 10, "a", at=0.0), accepted(10, 10, "b", at=1.0)],
                       Capacity(workers=1, capacity=12, free=12))
    assert sorted(len(s.in_flight) for s in states) == [3, 3]


def test_a_dead_workers_slots_vanish_within_the_expiry() -> None:
    fleet = Fleet("crosstalk", expiry_s=4.0)
    assert fleet.observe(hb("w-a", 4), 0.0) and fleet.observe(hb("w-b", 4, ("r1",)), 0.0)
    assert not fleet.observe(hb("w-x", 100, agent="someone-else"), 0.0)  # another agent name
    view = fleet.view(1.0)
    assert (view.workers, view.capacity, view.free, dict(view.placed)) == (2, 8, 7, {"r1": 1})
    fleet.observe(hb("w-b", 4, ("r1", "r2")), 3.0)  # w-a is SIGKILLed after its beat at 0.0
    assert fleet.view(4.0).free == 4 + 2  # w-a still counts until its expiry
    view = fleet.view(4.5)
    assert (view.workers, view.capacity, view.free) == (1, 4, 2)
    assert fleet.expire(4.5) == ["w-a"] and fleet.expire(4.5) == []
    assert fleet.view(100.0) == Capacity()  # everyone silent: nothing admitted


def test_a_closing_worker_offers_no_slot_but_its_rooms_stay_placed() -> None:
    fleet = Fleet("crosstalk")
    fleet.observe(hb("w-a", 4, ("r1", "r1"), closing=True), 0.0)
    view = fleet.view(0.5)
    assert (view.capacity, view.free, dict(view.placed)) == (0, 0, {"r1": 2})


def test_the_heartbeat_is_a_valid_contract_and_its_subject_validates_the_worker_id() -> None:
    beat = hb("w-host-12-abcdef", 16, ("room-b", "room-a"))
    assert (beat.active, beat.free, beat.rooms) == (2, 14, ("room-a", "room-b"))
    assert contracts.decode(contracts.encode(beat), WorkerCapacity) == beat
    assert subjects.worker_capacity(beat.worker_id) == "worker.capacity.w-host-12-abcdef"
    for bad in ("a.b", "*", ">", "has space", ""):
        with pytest.raises(ContractError):
            subjects.worker_capacity(bad)
    raw = msgspec.json.decode(contracts.encode(beat))
    with pytest.raises(ContractError) as err:
        contracts.decode(msgspec.json.encode({**raw, "worker_id": "a.b"}), WorkerCapacity)
    assert err.value.field == "worker_id"
    wid = capacity.new_worker_id("my.host.example", 42)
    assert wid.startswith("w-my-42-") and contracts.is_token(wid)


# --------------------------------------------------------------------------- no_capacity


def _dispatched(state: BatchState, cid: str, attempt: int, at: float) -> ConversationDispatched:
    return ConversationDispatched(batch_id=state.spec.batch_id, conversation_id=cid, attempt=attempt,
                                  room=room_name(cid, attempt), at=at)


def test_an_unplaced_dispatch_is_no_capacity_and_does_not_use_an_attempt() -> None:
    assert "no_capacity" in REASONS
    state = accepted(1, 1)
    cid = conversation_id("b1", 0)
    attempt, t = 1, 0.0
    # livekit-server placed neither dispatch, again and again: re-queued, no attempt used
    for _ in range(core.MAX_NO_CAPACITY_REQUEUES):
        state = apply(state, _dispatched(state, cid, attempt, t))
        room = room_name(cid, attempt)
        assert core.on_tick(state, t + 5, SETTINGS, {room}) == []  # deadline counts from dispatch
        [ev] = core.on_tick(state, t + 11, SETTINGS, {room})
        assert isinstance(ev, ConversationSettled)
        assert reason_label(ev.reason) == "no_capacity" and ev.retry
        state = apply(state, ev)
        attempt, t = attempt + 1, t + 20
    # bounded: the batch never hangs on capacity that is announced but never there
    state = apply(state, _dispatched(state, cid, attempt, t))
    [ev] = core.on_tick(state, t + 11, SETTINGS, {room_name(cid, attempt)})
    assert isinstance(ev, ConversationSettled) and not ev.retry


def test_placed_but_never_joined_is_a_join_timeout_and_no_capacity_left_every_attempt() -> None:
    state = accepted(1, 1)
    cid = conversation_id("b1", 0)
    state = apply(state, _dispatched(state, cid, 1, 0.0))
    [ev] = core.on_tick(state, 11.0, SETTINGS, {"some-other-room"})
    assert isinstance(ev, ConversationSettled) and ev.reason == "join_timeout" and ev.retry
    state = apply(state, ev)
    # a no_capacity attempt in between does not count: 3 real attempts still allowed
    state = apply(state, _dispatched(state, cid, 2, 20.0))
    [ev] = core.on_tick(state, 31.0, SETTINGS, {room_name(cid, 2)})
    assert reason_label(ev.reason) == "no_capacity" and ev.retry
    state = apply(state, ev)
    results = []
    for attempt, t in ((3, 40.0), (4, 60.0)):
        state = apply(state, _dispatched(state, cid, attempt, t))
        [ev] = core.on_tick(state, t + 11, SETTINGS)
        results.append((ev.reason, ev.retry))
        state = apply(state, ev)
    assert results == [("join_timeout", True), ("join_timeout", False)]
    assert state.failed == 1


def test_join_overdue_lists_only_unjoined_attempts_past_the_deadline() -> None:
    state = accepted(3, 3)
    c0, c1 = conversation_id("b1", 0), conversation_id("b1", 1)
    state = apply(state, _dispatched(state, c0, 1, 0.0), _dispatched(state, c1, 1, 5.0))
    assert [c.conversation_id for c in core.join_overdue(state, 12.0, SETTINGS)] == [c0]
    assert [c.conversation_id for c in core.join_overdue(state, 16.0, SETTINGS)] == [c0, c1]


def test_batch_watch_shows_the_conversations_queued_for_capacity() -> None:
    from cli.progress import BatchProgress, status_line

    p = BatchProgress("b1")
    p.apply(BatchAccepted(spec=spec(10, 10), at=0.0))
    assert "queued" not in status_line(p, 1.0)  # no dispatcher.status seen: the line is as before
    st = contracts.DispatcherStatus(workers=1, capacity=4, free=0, reserved=0, queued=8,
                                    batches={"b1": contracts.BatchQueue(in_flight=2, queued=8, pending=8)}, at=1.0)
    p.apply_status(st)
    assert ", 8 queued for worker capacity (0 of 4 sessions free)," in status_line(p, 1.0)
    p.apply_status(contracts.DispatcherStatus(workers=1, capacity=4, free=4, reserved=0, queued=0, at=2.0))
    assert "queued" not in status_line(p, 2.0)
