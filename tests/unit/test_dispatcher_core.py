"""The dispatcher's pure core: validation, the batch fold, and every decision, with no I/O."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from support import dispatcher
from support.dispatcher import spec

from services.dispatcher import core
from services.dispatcher.inputs import decode_start
from services.dispatcher.state import (
    BatchState,
    conversation_id,
    evolve,
    parse_room,
    replay,
    room_name,
)
from services.dispatcher.validate import Rejection, generated_batch_id, validate
from shared import contracts
from shared.config import Settings
from shared.contracts import (
    AgentJoined,
    BatchAccepted,
    BatchEvent,
    BatchFinished,
    BatchSpec,
    ConversationDispatched,
    ConversationEnded,
    ConversationJoined,
    ConversationSettled,
    StartBatch,
)
from shared.metrics import REASONS, reason_label
from shared.scenarios import DEFAULT_SCENARIO, library

SETTINGS = dispatcher.settings(max_concurrency=20)
SCENARIOS = library()
MAX_BODY = 64 * 1024


def check(body: bytes, settings: Settings = SETTINGS) -> BatchSpec | Rejection:
    """The entrypoint decodes the body; the core validates the decoded command."""
    cmd = decode_start(body)
    return cmd if isinstance(cmd, Rejection) else validate(cmd, settings, SCENARIOS, received_at=1_795_000_000.0,
                                                           seed="7:1")


def count(cid: str, attempt: int, agents: int) -> core.RoomCount:
    return core.RoomCount(batch_id=cid.rsplit("-", 1)[0], conversation_id=cid, attempt=attempt, agents=agents)


def fold(events: list[BatchEvent]) -> BatchState:
    states = replay((e, i + 1) for i, e in enumerate(events))
    assert len(states) == 1
    return next(iter(states.values()))


def joined(state: BatchState, cid: str, attempt: int, role: str, at: float) -> AgentJoined:
    return AgentJoined(batch_id=state.spec.batch_id, conversation_id=cid, attempt=attempt, room=f"{cid}-a{attempt}",
                       role=role, job_id=f"AJ_{role}", identity=role, at=at)


def ended(state: BatchState, cid: str, attempt: int, *, ok: bool, reason: str, turns: int = 4) -> ConversationEnded:
    return ConversationEnded(batch_id=state.spec.batch_id, conversation_id=cid, attempt=attempt,
                             room=f"{cid}-a{attempt}", reason=reason, ok=ok, turns=turns, at=0.0)


# --------------------------------------------------------------------------- validation


def test_an_empty_object_gets_every_default() -> None:
    got = check(b"{}")
    assert isinstance(got, BatchSpec)
    assert (got.conversations, got.concurrency, got.scenario, got.language, got.max_turns, got.mode) == (
        1, 1, DEFAULT_SCENARIO, SCENARIOS[DEFAULT_SCENARIO].language, 8, "text")
    assert contracts.is_id(got.batch_id) and got.batch_id.startswith("b-20261")


def test_defaults_follow_the_scenario_and_the_configured_maximum() -> None:
    got = check(b'{"conversations": 50, "scenario": "hi-account-help"}')
    assert isinstance(got, BatchSpec)
    assert (got.concurrency, got.language) == (SETTINGS.max_concurrency, "hi")
    explicit = check(b'{"conversations": 3, "concurrency": 10, "language": "hi", "max_turns": 4, "batch_id": "x-1",'
                     b' "scenario": "hi-account-help"}')
    assert explicit == BatchSpec(batch_id="x-1", conversations=3, concurrency=3, scenario="hi-account-help",
                                 language="hi", max_turns=4, mode="text")


def test_a_language_the_offline_script_cannot_speak_is_rejected_naming_both() -> None:
    """Never English while Hindi was asked: the scripted model plays one script per scenario."""
    got = check(b'{"language": "hi"}')
    assert isinstance(got, Rejection) and got.field == "language"
    assert "'en-account-help'" in got.reason and "'hi'" in got.reason and "hi-account-help" in got.reason
    none = check(b'{"language": "fr"}')
    assert isinstance(none, Rejection) and "no scenario has an offline script in 'fr'" in none.reason
    # a real model is told the language in the persona prompt, so any language is served
    real = validate(StartBatch(language="hi"), replace(SETTINGS, real_model=True), SCENARIOS,
                    received_at=1_795_000_000.0, seed="1:1")
    assert isinstance(real, BatchSpec) and (real.scenario, real.language) == (DEFAULT_SCENARIO, "hi")


def test_a_generated_batch_id_is_deterministic_per_stored_command() -> None:
    a = generated_batch_id(1_795_000_000.0, "7:1")
    assert a == generated_batch_id(1_795_000_000.0, "7:1")
    assert a != generated_batch_id(1_795_000_000.0, "8:1")
    assert contracts.is_id(a) and len(a) == len("b-20261125-165200-3fa2c1")


def test_a_voice_batch_against_a_target_agent_is_accepted() -> None:
    """Voice mode with target_agent: crosstalk's customer speaks and listens through audio tracks."""
    got = check(b'{"target_agent": "acme", "mode": "voice", "conversations": 3}')
    assert isinstance(got, BatchSpec), got
    assert (got.mode, got.target_agent, got.conversations) == ("voice", "acme", 3)


@pytest.mark.parametrize(("body", "field", "fragment"), [
    # an unknown field is rejected by name, never ignored
    (b'{"conversation": 200}', "conversation", "did you mean 'conversations'?"),
    (b'{"concurency": 5}', "concurency", "did you mean 'concurrency'?"),
    (b'{"zzz": 1}', "zzz", "known fields: batch_id, conversations"),
    (b'{"trials": 3, "conversations": 2}', "conversations", "contradicts scenarios x trials = 1 x 3 = 3"),
    # the user's own agent: a token, not crosstalk's own name, metadata bounded and only with a target
    (b'{"target_agent": "my.agent"}', "target_agent", "[A-Za-z0-9_-]"),
    (b'{"target_agent": ""}', "target_agent", "[A-Za-z0-9_-]"),
    (b'{"target_agent": 7}', "target_agent", "Expected `str"),
    (b'{"target_agent": "crosstalk"}', "target_agent", "crosstalk's own agent name"),
    (b'{"target_agent": "acme", "target_metadata": "' + b"x" * 16385 + b'"}', "target_metadata", "16384"),
    (b'{"target_metadata": "{}"}', "target_metadata", "only used with target_agent"),
    # a value out of range, of the wrong kind, or no JSON object at all
    (b'{"conversations": 1001}', "conversations", "at most 1000"),
    (b'{"conversations": 0}', "conversations", ">= 1"),
    (b'{"concurrency": 21}', "concurrency", "at most 20"),
    (b'{"scenario": "nope"}', "scenario", "unknown scenario 'nope'"),
    (b'{"mode": "speech"}', "mode", "Invalid enum value 'speech'"),
    (b'{"batch_id": "a.b"}', "batch_id", "regex"),
    (b'{"max_turns": 201}', "max_turns", "<= 200"),
    (b"\xff", "$", "UTF-8"),
    (b"[1, 2]", "$", "object"),
    (b'{"pad": "' + b"x" * MAX_BODY + b'"}', "$", "limit"),
])
def test_a_bad_command_or_an_unknown_field_names_the_field_and_the_reason(body: bytes, field: str, fragment: str) -> None:
    got = check(body)
    assert isinstance(got, Rejection)
    assert got.field == field and fragment in got.reason


def test_a_rejection_echoes_only_a_valid_batch_id() -> None:
    named = check(b'{"batch_id": "ok-1", "conversations": -1}')
    assert isinstance(named, Rejection) and named.batch_id == "ok-1"
    for body in (b'{"batch_id": "../x", "conversations": -1}', b'{"batch_id": "a*", "mode": "voice"}', b"{"):
        got = check(body)
        assert isinstance(got, Rejection) and got.batch_id is None


@given(st.binary(max_size=300) | st.dictionaries(
    st.sampled_from(["batch_id", "conversations", "concurrency", "scenario", "language", "max_turns", "mode", "x"]),
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=70),
    max_size=7).map(lambda d: contracts.encode(d)))
@hsettings(max_examples=300, deadline=None)
def test_validation_never_raises_and_never_lets_a_bad_value_through(body: bytes) -> None:
    got = check(body)
    if isinstance(got, Rejection):
        assert got.field in {"$", "batch_id", "conversations", "concurrency", "scenario", "language",
                             "max_turns", "mode", "x"}
        assert got.reason
        assert got.batch_id is None or contracts.is_id(got.batch_id)
    else:
        assert contracts.is_id(got.batch_id)
        assert 1 <= got.conversations <= SETTINGS.max_conversations
        assert 1 <= got.concurrency <= min(got.conversations, SETTINGS.max_concurrency)
        assert got.scenario in SCENARIOS and got.mode == "text"
        assert got.language == SCENARIOS[got.scenario].language


# --------------------------------------------------------------------------- naming and reasons


def test_names_round_trip() -> None:
    cid = conversation_id("batch-7", 42)
    assert cid == "batch-7-00042"
    assert parse_room(room_name(cid, 3)) == (cid, 3)
    assert parse_room("some-other-room") is None
    assert contracts.is_token(room_name(conversation_id("x" * 64, 999_999), 20))


@pytest.mark.parametrize(("raw", "label"), [
    ("end_conversation: support", "end_conversation"),
    ("max_turns", "max_turns"),
    ("peer_left", "agent_left"),
    ("error: boom", "agent_error"),
    ("denied: room full", "role_denied"),
    ("something odd", "other"),
    ("", "other"),
])
def test_every_reason_starts_with_a_bounded_label(raw: str, label: str) -> None:
    got = core.normalize_reason(raw)
    assert reason_label(got) == label and got.split(":", 1)[0] in REASONS


# --------------------------------------------------------------------------- the fold


def test_the_fold_follows_a_conversation_through_its_life() -> None:
    s = spec(n=2)
    events: list[BatchEvent] = [
        BatchAccepted(spec=s, at=100.0),
        ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=1, room="b1-00000-a1", at=101.0),
        ConversationJoined(batch_id="b1", conversation_id="b1-00000", attempt=1, join_seconds=2.0, at=103.0),
        ConversationSettled(batch_id="b1", conversation_id="b1-00000", attempt=1, outcome="failed",
                            reason="agent_left: 1 of 2 agents in the room", retry=True, at=110.0),
        ConversationDispatched(batch_id="b1", conversation_id="b1-00001", attempt=1, room="b1-00001-a1", at=111.0),
    ]
    state = fold(events)
    assert state.seq == 5 and state.next_index == 2 and state.retry_queue == ("b1-00000",)
    assert state.in_flight == {"b1-00001"} and state.pending == 1
    assert state.convs["b1-00000"].status == "retry"
    # a retry gets the next attempt; repeats and stale attempts change nothing
    events += [
        ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=2, room="b1-00000-a2", at=112.0),
        ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=2, room="b1-00000-a2", at=113.0),
        ConversationSettled(batch_id="b1", conversation_id="b1-00000", attempt=1, outcome="completed",
                            reason="end_conversation: support", retry=False, at=114.0),
        ConversationSettled(batch_id="b1", conversation_id="b1-00000", attempt=2, outcome="completed",
                            reason="end_conversation: support", retry=False, turns=6, at=115.0),
        ConversationSettled(batch_id="b1", conversation_id="b1-00001", attempt=1, outcome="failed",
                            reason="join_timeout", retry=False, at=116.0),
    ]
    state = fold(events)
    assert state.convs["b1-00000"].attempt == 2 and state.convs["b1-00000"].turns == 6
    assert state.convs["b1-00000"].dispatched_at == 112.0
    assert (state.completed, state.failed, state.pending, state.in_flight) == (1, 1, 0, frozenset())
    finished = core.finish(state, 120.0)
    assert finished == BatchFinished(batch_id="b1", status="failed", requested=2, completed=1, failed=1,
                                     started_at=100.0, finished_at=120.0)
    done = fold([*events, finished])
    assert (done.status, done.running, done.convs) == ("failed", False, {})
    assert core.finish(done, 130.0) is None


def test_a_dispatch_out_of_order_or_after_the_end_is_ignored() -> None:
    state = fold([BatchAccepted(spec=spec(n=2), at=1.0)])
    skip = ConversationDispatched(batch_id="b1", conversation_id="b1-00001", attempt=1, room="b1-00001-a1", at=2.0)
    assert evolve(state, skip, 2).next_index == 0  # type: ignore[union-attr]
    assert evolve(None, skip) is None


# --------------------------------------------------------------------------- decisions


def test_dispatch_respects_batch_concurrency_the_global_cap_and_retries_first() -> None:
    a = fold([BatchAccepted(spec=spec(n=5, concurrency=2, bid="a"), at=1.0)])
    first = core.plan_dispatch([a], global_cap=10, now=2.0)
    assert first == ConversationDispatched(batch_id="a", conversation_id="a-00000", attempt=1, room="a-00000-a1",
                                           at=2.0)
    a = evolve(a, first, 2)
    a = evolve(a, core.plan_dispatch([a], 10, 3.0), 3)
    assert a is not None and len(a.in_flight) == 2
    assert core.plan_dispatch([a], 10, 4.0) is None  # batch concurrency
    b = fold([BatchAccepted(spec=spec(n=5, concurrency=5, bid="b"), at=2.0)])
    assert core.plan_dispatch([a, b], global_cap=2, now=4.0) is None  # global cap
    assert core.plan_dispatch([a, b], global_cap=3, now=4.0).batch_id == "b"  # type: ignore[union-attr]
    # a failed attempt to be retried goes before the next new conversation
    a = evolve(a, ConversationSettled(batch_id="a", conversation_id="a-00001", attempt=1, outcome="failed",
                                           reason="join_timeout", retry=True, at=5.0), 4)
    nxt = core.plan_dispatch([a], 10, 6.0)
    assert nxt is not None and (nxt.conversation_id, nxt.attempt, nxt.room) == ("a-00001", 2, "a-00001-a2")


def test_admission_waits_while_max_joining_conversations_wait_for_agents() -> None:
    a = fold([BatchAccepted(spec=spec(n=10, concurrency=10, bid="a"), at=1.0)])
    for t in (2.0, 3.0):
        a = evolve(a, core.plan_dispatch([a], 100, t, max_joining=2), int(t))
    assert a is not None and core.joining(a) == 2
    assert core.plan_dispatch([a], 100, 4.0, max_joining=2) is None  # two still joining
    assert core.plan_dispatch([a], 100, 4.0) is not None  # no window: concurrency alone decides
    a = evolve(a, ConversationJoined(batch_id="a", conversation_id="a-00000", attempt=1, join_seconds=1.0,
                                          at=4.5), 5)
    assert a is not None and core.joining(a) == 1
    nxt = core.plan_dispatch([a], 100, 5.0, max_joining=2)
    assert nxt is not None and nxt.conversation_id == "a-00002"


def test_both_roles_must_join_the_current_attempt() -> None:
    state = fold([BatchAccepted(spec=spec(), at=1.0),
                  ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=2, room="b1-00000-a2",
                                         at=10.0)])
    watch, events = core.on_agent_joined(state, joined(state, "b1-00000", 1, "customer", 11.0), core.Watch())
    assert (watch, events) == (core.Watch(), [])  # an old attempt
    watch, events = core.on_agent_joined(state, joined(state, "b1-00000", 2, "customer", 11.0), watch)
    assert events == [] and watch.roles == {"customer"}
    watch, again = core.on_agent_joined(state, joined(state, "b1-00000", 2, "customer", 11.5), watch)
    assert again == []  # the same role twice is not both roles
    watch, events = core.on_agent_joined(state, joined(state, "b1-00000", 2, "support", 13.5), watch)
    assert events == [ConversationJoined(batch_id="b1", conversation_id="b1-00000", attempt=2, join_seconds=3.5,
                                         at=13.5)]


def test_an_ended_conversation_completes_or_fails_with_retries_up_to_the_maximum() -> None:
    state = fold([BatchAccepted(spec=spec(), at=1.0),
                  ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=1, room="r", at=2.0)])
    [ok] = core.on_conversation_ended(state, ended(state, "b1-00000", 1, ok=True, reason="max_turns", turns=8),
                                      9.0, SETTINGS)
    assert (ok.outcome, ok.reason, ok.retry, ok.turns) == ("completed", "max_turns", False, 8)
    [bad] = core.on_conversation_ended(state, ended(state, "b1-00000", 1, ok=False, reason="error: llm down"),
                                       9.0, SETTINGS)
    assert (bad.outcome, bad.reason, bad.retry) == ("failed", "agent_error: error: llm down", True)
    assert core.on_conversation_ended(state, ended(state, "b1-00000", 7, ok=True, reason="max_turns"), 9.0,
                                      SETTINGS) == []
    last = fold([BatchAccepted(spec=spec(), at=1.0),
                 ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=3, room="r", at=2.0)])
    [final] = core.on_conversation_ended(last, ended(last, "b1-00000", 3, ok=False, reason="peer_left"), 9.0,
                                         SETTINGS)
    assert (final.retry, final.reason) == (False, "agent_left: peer_left")


def test_deadlines_count_from_the_dispatch_and_the_batch_finishes() -> None:
    state = fold([
        BatchAccepted(spec=spec(n=2), at=1.0),
        ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=1, room="r0", at=100.0),
        ConversationDispatched(batch_id="b1", conversation_id="b1-00001", attempt=1, room="r1", at=100.0),
        ConversationJoined(batch_id="b1", conversation_id="b1-00001", attempt=1, join_seconds=1.0, at=101.0),
    ])
    assert core.on_tick(state, 110.0, SETTINGS) == []
    [timeout] = core.on_tick(state, 110.5, SETTINGS)
    assert (timeout.conversation_id, timeout.reason, timeout.retry) == ("b1-00000", "join_timeout", True)
    events = core.on_tick(state, 200.5, SETTINGS)
    assert [(e.conversation_id, e.reason) for e in events] == [  # type: ignore[union-attr]
        ("b1-00000", "join_timeout"), ("b1-00001", "conversation_timeout")]


def test_an_agent_missing_on_two_consecutive_checks_has_left() -> None:
    state = fold([
        BatchAccepted(spec=spec(), at=1.0),
        ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=1, room="r0", at=100.0),
        ConversationJoined(batch_id="b1", conversation_id="b1-00000", attempt=1, join_seconds=1.0, at=101.0),
    ])
    w, events = core.on_liveness(state, count("b1-00000", 1, 1), core.Watch(), 110.0, SETTINGS)
    assert events == [] and w.misses == 1
    w, events = core.on_liveness(state, count("b1-00000", 1, 2), w, 113.0, SETTINGS)
    assert events == [] and w.misses == 0  # a blip is forgiven
    w, _ = core.on_liveness(state, count("b1-00000", 1, 0), w, 116.0, SETTINGS)
    w, [left] = core.on_liveness(state, count("b1-00000", 1, 1), w, 119.0, SETTINGS)
    assert (left.outcome, left.reason, left.retry) == ("failed", "agent_left: 1 of 2 agents in the room", True)
    # not joined yet: the join deadline, not liveness, decides
    fresh = fold([BatchAccepted(spec=spec(), at=1.0),
                  ConversationDispatched(batch_id="b1", conversation_id="b1-00000", attempt=1, room="r", at=1.0)])
    assert core.on_liveness(fresh, count("b1-00000", 1, 0), core.Watch(misses=5), 2.0, SETTINGS)[1] == []


def test_the_token_bucket_ramps_without_bursts() -> None:
    bucket = core.TokenBucket(rate=4.0)
    times = []
    now = 0.0
    for _ in range(9):
        now += bucket.delay(now)
        bucket.take(now)
        times.append(now)
    assert times == [0.25 * i for i in range(9)]
    idle = now + 60.0  # a long idle period does not bank tokens for a burst
    assert bucket.delay(idle) == 0.0
    bucket.take(idle)
    assert bucket.delay(idle) == 0.25


# --------------------------------------------------------------------------- a whole batch, simulated


@given(seed=st.integers(0, 2**32), n=st.integers(1, 25), concurrency=st.integers(1, 6),
       max_attempts=st.integers(1, 3), cap=st.integers(1, 8))
@hsettings(max_examples=150, deadline=None)
def test_a_simulated_batch_always_finishes_with_every_conversation_accounted_for(
        seed: int, n: int, concurrency: int, max_attempts: int, cap: int) -> None:
    """Random joins, ends, deaths and silences: every conversation ends completed or failed, the
    in-flight bound holds, no conversation ever has two live attempts, and replaying the log gives
    the state the live process had."""
    rng = random.Random(seed)
    cfg = dispatcher.settings(max_concurrency=cap, conversation_timeout_s=60.0, max_attempts=max_attempts)
    log: list[BatchEvent] = [BatchAccepted(spec=spec(n=n, concurrency=concurrency), at=0.0)]
    state = fold(log)
    watches: dict[tuple[str, int], core.Watch] = {}
    now = 0.0

    def emit(events: list[BatchEvent]) -> None:
        nonlocal state
        for ev in events:
            log.append(ev)
            new = evolve(state, ev, len(log))
            assert new is not None
            state = new
            assert len(state.in_flight) <= min(concurrency, cap)

    for _ in range(5000):
        if not state.running:
            break
        now += rng.choice([0.5, 1.0, 3.0])
        ev = core.plan_dispatch([state], cap, now)
        if ev is not None:
            emit([ev])
        for cid in sorted(state.in_flight):
            conv = state.convs[cid]
            roll = rng.random()
            if roll < 0.3 and conv.joined_at is None:
                for role in ("customer", "support"):
                    key = (cid, conv.attempt)
                    w, events = core.on_agent_joined(state, joined(state, cid, conv.attempt, role, now),
                                                     watches.get(key, core.Watch()))
                    watches[key] = w
                    emit(events)
            elif roll < 0.5:
                emit(core.on_conversation_ended(state, ended(state, cid, conv.attempt, ok=rng.random() < 0.7,
                                                             reason="end_conversation: support"), now, cfg))
            elif roll < 0.6 and conv.joined_at is not None:
                key = (cid, conv.attempt)
                w, events = core.on_liveness(state, count(cid, conv.attempt, 1), watches.get(key, core.Watch()),
                                             now, cfg)
                watches[key] = w
                emit(events)
            # else: silence; the deadlines will decide
        emit(core.on_tick(state, now, cfg))

    assert not state.running, "the batch hung"
    assert state.completed + state.failed == n
    settled = [e for e in log if isinstance(e, ConversationSettled)]
    finals = [e for e in settled if not e.retry]
    assert sorted(e.conversation_id for e in finals) == [conversation_id("b1", i) for i in range(n)]
    assert all(e.attempt <= max_attempts for e in settled)
    assert all(e.reason.split(":", 1)[0] in REASONS for e in settled)
    live: dict[str, int] = {}
    for e in log:
        if isinstance(e, ConversationDispatched):
            assert e.conversation_id not in live
            live[e.conversation_id] = e.attempt
        elif isinstance(e, ConversationSettled):
            assert live.pop(e.conversation_id) == e.attempt
    replayed = fold(log)
    assert (replayed.status, replayed.completed, replayed.failed, replayed.seq) == (
        state.status, state.completed, state.failed, state.seq)
    assert isinstance(log[-1], BatchFinished) and log[-1].completed == state.completed
