"""Fenced leases, the pure parts: server-time parsing, the sink's lease verdict and conflict rule,
the worker's lease keeper and what a failed or unleased turn does to a conversation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from services.sink import core
from services.sink.core import BatchDoc, Transcript, offer
from services.sink.fencing import INF, LeaseView, Mark, extend, verdict
from shared.contracts import JobMetadata, TurnRecorded
from shared.servertime import parse_ts

# --------------------------------------------------------------------------- server time


def test_parse_ts_keeps_nanoseconds_and_zones() -> None:
    base = datetime(2026, 11, 30, 1, 43, 52, tzinfo=UTC).timestamp()
    assert parse_ts("2026-11-30T01:43:52.022527382Z") == pytest.approx(base + 0.022527382, abs=1e-6)
    assert parse_ts("2026-11-30T01:43:52Z") == base
    assert parse_ts("2026-11-30T02:43:52.5+01:00") == base + 0.5
    with pytest.raises(ValueError):
        parse_ts("yesterday")


# --------------------------------------------------------------------------- sink: lease verdict

L = 100  # the token under test: its grant is stream sequence 100


def mark(seq: int, ts: float, lease: int | None = L, kind: str = "renewed", lease_s: float = 10.0) -> Mark:
    return Mark(seq=seq, ts=ts, lease=lease, kind=kind, expires=ts if kind == "released" else ts + lease_s)


def view(*marks: Mark, complete_until: float = INF) -> LeaseView:
    v = LeaseView(room="r1", role="customer", lease=L, complete_until=complete_until)
    for m in marks:
        v = extend(v, m)
    return v


def test_a_turn_inside_its_lease_is_stored() -> None:
    v = view(mark(L, 1000.0, kind="granted"), mark(130, 1008.0), mark(170, 1016.0))
    for t in (1000.0, 1009.9, 1017.0, 1025.9):
        assert verdict(v, t) is None, t
    assert verdict(v, 1026.0) == "expired"  # last renewal at 1016 + 10 s


def test_renewals_chain_into_one_lease_even_if_accepted_a_hair_late() -> None:
    # renewal judged live by the allocator just before 1010, stored at 1010.002
    v = view(mark(L, 1000.0, kind="granted"), mark(120, 1010.002))
    assert verdict(v, 1010.001) is None


def test_a_takeover_supersedes_the_old_token_from_its_timestamp_on() -> None:
    v = view(mark(L, 1000.0, kind="granted"), mark(140, 1012.0, lease=140, kind="granted"))
    assert v.closed
    assert verdict(v, 1005.0) is None  # before the takeover (and live)
    assert verdict(v, 1010.5) == "expired"  # expired, not yet taken
    assert verdict(v, 1012.0) == "superseded"
    assert verdict(v, 1500.0) == "superseded"


def test_released_and_unknown_tokens_are_refused() -> None:
    v = view(mark(L, 1000.0, kind="granted"), mark(110, 1003.0, kind="released"))
    assert verdict(v, 1002.0) is None and verdict(v, 1003.0) == "released"
    assert verdict(LeaseView(room="r1", role="customer", lease=L, found=False), 1001.0) == "unknown"


def test_a_view_says_when_it_must_read_further() -> None:
    v = view(mark(L, 1000.0, kind="granted"), complete_until=1004.0)
    assert v.knows(1004.0) and not v.knows(1004.5)
    assert view(mark(L, 1000.0, kind="granted"), mark(150, 1001.0, lease=150, kind="granted"),
                complete_until=0.0).knows(5000.0)  # closed: nothing later matters
    # events after the closing one are not kept
    closed = view(mark(L, 1000.0, kind="granted"), mark(150, 1011.0, lease=150, kind="granted"))
    assert extend(closed, mark(151, 1012.0)) is closed


# --------------------------------------------------------------------------- sink: conflicts


def turn(n: int, text: str | None = None, attempt: int = 1) -> TurnRecorded:
    return TurnRecorded(batch_id="b1", conversation_id="c1", attempt=attempt, turn=n,
                        role="customer" if n % 2 == 0 else "support", text=text or f"turn {n}",
                        started_at=1.0, ended_at=2.0)


def test_a_different_text_for_a_stored_turn_is_a_conflict_not_a_duplicate() -> None:
    state: Transcript[int] = Transcript.recovered(1, 2)
    again = turn(1)
    assert core.repeats_stored(state, again)
    assert offer(state, again, 7, stored=("support", "turn 1")).outcome == "duplicate"
    step = offer(state, turn(1, text="something else"), 8, stored=("support", "turn 1"))
    assert step.outcome == "conflict" and step.acks == (8,) and step.lines == () and step.state == state
    assert not core.repeats_stored(state, turn(2)) and not core.repeats_stored(state, turn(0, attempt=2))


def test_a_different_text_for_a_held_turn_is_a_conflict_and_the_first_stays() -> None:
    state: Transcript[int] = Transcript()
    held = offer(state, turn(2, text="first"), 1)
    assert held.outcome == "held"
    same = offer(held.state, turn(2, text="first"), 2)
    assert same.outcome == "duplicate"
    other = offer(same.state, turn(2, text="second"), 3)
    assert other.outcome == "conflict" and other.acks == (3,)
    run = offer(offer(other.state, turn(0), 4).state, turn(1), 5)
    assert [t.text for t in run.lines] == ["turn 1", "first"] and sorted(run.acks) == [1, 2, 5]


def test_flag_conflict_counts_on_the_conversation() -> None:
    doc = core.flag_conflict(core.flag_conflict(BatchDoc(batch_id="b1"), "c1"), "c1")
    assert doc.conversations["c1"].conflicts == 2
    assert b'"conflicts": 2' in core.encode_doc(doc)


# --------------------------------------------------------------------------- worker


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Replies:
    """A NATS client whose role.renew replies are scripted."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)
        self.sent = 0

    async def request(self, subject: str, body: bytes, timeout: float) -> Any:
        from nats.errors import NoRespondersError

        from shared import contracts
        from shared.contracts import RenewReply

        self.sent += 1
        r = self.replies.pop(0) if self.replies else "none"
        if r == "none":
            raise NoRespondersError

        class Msg:
            data = contracts.encode(RenewReply(renewed=r == "ok", lease_s=3.0 if r == "ok" else None,
                                               reason=None if r == "ok" else r))

        return Msg()


def keeper(nc: Any, clock: FakeClock) -> Any:
    from worker.lifecycle.lease import LeaseKeeper

    lost: list[str] = []
    k = LeaseKeeper(nc, room="r1", job_id="AJ_a", role="customer", lease=5, lease_s=3.0, sent_at=0.0,
                    clock=clock, on_lost=lost.append)
    return k, lost


async def test_keeper_extends_from_the_send_time_and_stops_on_a_refusal() -> None:
    clock = FakeClock()
    k, lost = keeper(Replies("ok", "superseded"), clock)
    assert k.valid() and k.margin_s == pytest.approx(0.3)
    clock.t = 1.0
    await k.renew_once()
    assert k.valid_until == 4.0 and lost == []
    clock.t = 3.69
    assert k.valid()  # inside 4.0 minus the 0.3 s margin
    clock.t = 3.7
    assert not k.valid()
    clock.t = 3.6
    await k.renew_once()
    assert lost == ["superseded"] and not k.valid()


async def test_keeper_gives_up_at_the_deadline_when_nobody_answers() -> None:
    import time

    from worker.lifecycle.lease import LeaseKeeper

    lost: list[str] = []
    sent = time.monotonic()
    k = LeaseKeeper(Replies(), room="r1", job_id="AJ_a", role="customer", lease=5, lease_s=0.6,  # type: ignore[arg-type]
                    sent_at=sent, on_lost=lost.append)
    await asyncio.wait_for(k.run(), 2)  # renews from 0.2 s on; nobody ever answers
    elapsed = time.monotonic() - sent
    assert lost and lost[0].startswith("not renewed in time") and "NoRespondersError" in lost[0]
    assert 0.5 <= elapsed < 0.6  # given up before the lease could have expired, not long before
    assert not k.valid()


def meta() -> JobMetadata:
    return JobMetadata(batch_id="b1", conversation_id="c1", attempt=1, scenario="en-account-help", language="en",
                       mode="text", max_turns=8)


class Bridge:
    async def send_turn(self, text: str, turn: int) -> None:
        pass

    async def send_control(self, kind: str, **fields: str) -> None:
        pass


def assistant(text: str) -> Any:
    from livekit.agents.llm import ChatMessage
    from livekit.agents.voice.events import ConversationItemAddedEvent

    return ConversationItemAddedEvent(item=ChatMessage(role="assistant", content=[text]))


async def test_a_turn_that_fails_ends_the_conversation_at_once_with_the_reason() -> None:
    from prometheus_client import CollectorRegistry

    from shared.metrics import WorkerMetrics
    from worker.lifecycle.reports import Reports
    from worker.pair.conversation import Conversation

    async def publish(*_: Any, **__: Any) -> None:
        raise RuntimeError("stream gone")

    reports = Reports(publish, meta=meta(), room="r1", role="customer", metrics=WorkerMetrics(CollectorRegistry()))
    conv = Conversation(reports=reports, bridge=Bridge())  # type: ignore[arg-type]
    conv.on_item(assistant("hello"))
    reason, ok, mine = await asyncio.wait_for(conv.done, 2)
    assert not ok and mine and reason.startswith("agent_error: customer: turn failed: RuntimeError: stream gone")


async def test_no_turn_is_published_on_a_lease_that_may_have_ended() -> None:
    from prometheus_client import CollectorRegistry

    from shared.metrics import WorkerMetrics
    from worker.lifecycle.reports import Reports
    from worker.pair.conversation import Conversation

    published: list[TurnRecorded] = []

    async def publish(subject: str, ev: TurnRecorded, msg_id: str | None = None) -> None:
        published.append(ev)

    clock = FakeClock()
    k, _ = keeper(Replies(), clock)
    reports = Reports(publish, meta=meta(), room="r1", role="customer", metrics=WorkerMetrics(CollectorRegistry()),
                      lease=k)
    conv = Conversation(reports=reports, bridge=Bridge(), lease=k)  # type: ignore[arg-type]
    conv.on_item(assistant("hello"))
    await asyncio.sleep(0.05)
    assert [(t.lease, t.room, t.text) for t in published] == [(5, "r1", "hello")]  # turns carry the lease
    clock.t = 2.8  # past valid_until - margin: the lease may be gone
    conv.on_item(assistant("still here?"))
    reason, ok, _ = await asyncio.wait_for(conv.done, 2)
    assert reason.startswith("lease_lost: ") and not ok
    assert len(published) == 1
