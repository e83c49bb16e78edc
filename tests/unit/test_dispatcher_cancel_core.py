"""``batch.cancel`` in the dispatcher's pure core: the decision, the fold, the end, and what follows."""

from __future__ import annotations

import json

from support import dispatcher
from support.dispatcher import spec

from services.dispatcher import cancel, core
from services.dispatcher.cancel import decode_cancel
from services.dispatcher.state import BatchState, conversation_id, evolve, replay
from services.dispatcher.validate import Rejection
from shared.contracts import (
    BatchAccepted,
    BatchCancelled,
    BatchEvent,
    BatchFinished,
    CancelBatch,
    ConversationDispatched,
    ConversationSettled,
)

SETTINGS = dispatcher.settings(max_concurrency=20)


class Run:
    """A batch driven through the core as the handlers drive it: decide, then fold what was decided."""

    def __init__(self, n: int = 10, concurrency: int = 2) -> None:
        self.events: list[BatchEvent] = [BatchAccepted(spec=spec(n, concurrency), at=0.0)]
        self.state: BatchState | None = evolve(None, self.events[0], 1)

    @property
    def s(self) -> BatchState:
        assert self.state is not None
        return self.state

    def add(self, *events: BatchEvent) -> list[BatchEvent]:
        for ev in events:
            self.events.append(ev)
            self.state = evolve(self.state, ev, len(self.events))
        return list(events)

    def dispatch(self, now: float = 1.0) -> ConversationDispatched | None:
        ev = core.plan_dispatch([self.s], SETTINGS.max_concurrency, now)
        if ev is not None:
            self.add(ev)
        return ev

    def settle(self, cid: str, *, ok: bool, retry: bool = False, reason: str = "end_conversation: support",
               ) -> None:
        conv = self.s.convs[cid]
        self.add(ConversationSettled(batch_id=self.s.spec.batch_id, conversation_id=cid, attempt=conv.attempt,
                                     outcome="completed" if ok else "failed", reason=reason, retry=retry,
                                     turns=4 if ok else 0, at=2.0))

    def cancel(self, now: float = 3.0) -> tuple[bool, bool, str | None]:
        reply, events = cancel.on_cancel(self.state, "b1", now)
        self.add(*events)
        return reply.accepted, reply.duplicate, reply.field

    def tick(self, now: float = 4.0) -> list[BatchEvent]:
        return self.add(*core.on_tick(self.s, now, SETTINGS))


def test_a_cancel_stops_dispatch_and_the_batch_ends_cancelled_when_the_running_ones_settle() -> None:
    run = Run(n=10, concurrency=2)
    run.dispatch(), run.dispatch()
    run.settle(conversation_id("b1", 0), ok=True)
    run.dispatch()  # conversation 2 takes the free slot
    assert run.cancel() == (True, False, None)
    cancelled = run.events[-1]
    assert isinstance(cancelled, BatchCancelled)
    assert (cancelled.never_started, cancelled.in_flight) == (7, 2)
    assert run.s.running and run.s.pending == 0
    assert run.dispatch() is None  # nothing new, though a slot is free
    assert run.tick() == []  # two still in flight: not finished
    run.settle(conversation_id("b1", 1), ok=True)
    assert run.dispatch() is None
    run.settle(conversation_id("b1", 2), ok=False, reason="agent_left: 1 of 2 agents in the room")
    (finished,) = run.tick(now=9.0)
    assert finished == BatchFinished(batch_id="b1", status="cancelled", requested=10, completed=2, failed=1,
                                     cancelled=7, started_at=0.0, finished_at=9.0)
    assert finished.completed + finished.failed + finished.cancelled == finished.requested
    assert run.s.status == "cancelled" and not run.s.running


def test_a_cancel_with_nothing_in_flight_finishes_at_the_next_tick() -> None:
    run = Run(n=3)
    run.cancel()
    (finished,) = run.tick()
    assert isinstance(finished, BatchFinished)
    assert (finished.status, finished.completed, finished.failed, finished.cancelled) == ("cancelled", 0, 0, 3)


def test_a_waiting_retry_is_dropped_and_its_last_failure_is_final() -> None:
    run = Run(n=4, concurrency=2)
    run.dispatch(), run.dispatch()
    c0, c1 = conversation_id("b1", 0), conversation_id("b1", 1)
    run.settle(c0, ok=False, retry=True, reason="join_timeout")
    run.settle(c1, ok=True)
    assert run.s.retry_queue == (c0,)
    run.cancel()
    assert run.dispatch() is None  # the retry is not dispatched
    dropped, = run.tick(now=5.0)
    assert isinstance(dropped, ConversationSettled)
    assert (dropped.conversation_id, dropped.attempt, dropped.outcome, dropped.retry) == (c0, 1, "failed", False)
    assert dropped.reason == "join_timeout: not retried, batch cancelled"  # its label kept
    assert run.s.retry_queue == () and run.s.failed == 1
    (finished,) = run.tick(now=6.0)
    assert isinstance(finished, BatchFinished)
    assert (finished.completed, finished.failed, finished.cancelled) == (1, 1, 2)


def test_a_failure_after_the_cancel_is_not_retried() -> None:
    run = Run(n=5, concurrency=1)
    run.dispatch()
    run.cancel()
    conv = run.s.convs[conversation_id("b1", 0)]
    settled = core.settle_failed(run.s, conv, "join_timeout", 5.0, SETTINGS)
    assert settled.retry is False  # max_attempts 3 would have retried it


def test_repeated_cancels_are_idempotent_and_bad_ones_change_nothing() -> None:
    run = Run(n=3)
    assert cancel.on_cancel(None, "nope", 1.0)[0].field == "batch_id"  # unknown batch
    assert run.cancel() == (True, False, None)
    n = len(run.events)
    assert run.cancel() == (True, True, None)  # again while it drains
    run.tick()
    assert run.s.status == "cancelled"
    assert run.cancel() == (True, True, None)  # and once finished cancelled
    assert len(run.events) == n + 1  # only the BatchFinished


def test_a_batch_already_finished_cannot_be_cancelled() -> None:
    run = Run(n=1)
    run.dispatch()
    run.settle(conversation_id("b1", 0), ok=True)
    run.tick()
    assert run.s.status == "completed"
    reply, events = cancel.on_cancel(run.s, "b1", 9.0)
    assert (reply.accepted, reply.field, events) == (False, "batch_id", [])
    assert "already finished (completed)" in (reply.reason or "")


def test_a_replayed_log_keeps_the_batch_cancelled() -> None:
    run = Run(n=6, concurrency=2)
    run.dispatch(), run.dispatch()
    run.cancel()
    again = replay((e, i + 1) for i, e in enumerate(run.events))["b1"]
    assert again == run.s and again.cancelled_at == 3.0
    assert core.plan_dispatch([again], SETTINGS.max_concurrency, 5.0) is None
    # a dispatch after the cancel (never decided, but a log could hold one) changes nothing
    stray = ConversationDispatched(batch_id="b1", conversation_id=conversation_id("b1", 2), attempt=1,
                                   room=f"{conversation_id('b1', 2)}-a1", at=5.0)
    assert evolve(again, stray, 99) == evolve(again, BatchCancelled(batch_id="b1", never_started=0, in_flight=0,
                                                                    at=7.0), 99)
    assert core.queued(again) == 0


def test_bad_cancel_bodies_name_the_field() -> None:
    assert decode_cancel(b'{"batch_id": "b1"}') == CancelBatch(batch_id="b1")
    for body, field in ((b"{}", "batch_id"), (b'{"batch_id": "UP"}', "batch_id"), (b'{"batch_id": 5}', "batch_id"),
                        (b'{"batch_id": "a.b"}', "batch_id"), (b'{"batch_id": "b1", "why": 1}', "why"),
                        (b"nope", "$")):
        got = decode_cancel(body)
        assert isinstance(got, Rejection) and got.field == field, (body, got)


def test_the_sink_and_the_judge_see_a_cancelled_batch() -> None:
    """batch.json keeps ``cancelled`` (even when a short transcript fails a conversation after the end);
    the judge leaves out the conversations batch.json never heard of."""
    from services.judge.batch import never_started
    from services.sink.core import batch_doc

    doc = batch_doc.evolve(batch_doc.BatchDoc(batch_id="b1"), BatchAccepted(spec=spec(4), at=0.0))
    c0 = conversation_id("b1", 0)
    doc = batch_doc.evolve(doc, ConversationDispatched(batch_id="b1", conversation_id=c0, attempt=1,
                                                       room=f"{c0}-a1", at=1.0))
    assert batch_doc.evolve(doc, BatchCancelled(batch_id="b1", never_started=3, in_flight=1, at=2.0)) is doc
    done = batch_doc.evolve(doc, BatchFinished(batch_id="b1", status="cancelled", requested=4, completed=1, failed=0,
                                               cancelled=3, started_at=0.0, finished_at=3.0))
    assert (done.status, done.requested, done.completed, done.failed, done.cancelled) == ("cancelled", 4, 1, 0, 3)
    done = batch_doc.mark_incomplete(batch_doc.evolve(done, ConversationSettled(
        batch_id="b1", conversation_id=c0, attempt=1, outcome="completed", reason="end_conversation: support",
        retry=False, turns=4, at=2.5)), {c0: 1})
    assert (done.status, done.completed, done.failed) == ("cancelled", 0, 1)
    raw = json.loads(batch_doc.encode_doc(done))
    assert not never_started(raw, c0)
    assert never_started(raw, conversation_id("b1", 1))
    assert not never_started({**raw, "status": "failed"}, conversation_id("b1", 1))  # only a cancel skips
