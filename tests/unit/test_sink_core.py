"""The sink's pure decisions: turn ordering, attempts, crash recovery, batch.json fold."""

from __future__ import annotations

import random

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sink import core
from services.sink.core import BatchDoc, FileWrite, Transcript, batch_doc, offer, voice
from shared import contracts as wire

HINDI = "नमस्ते, मैं आपकी कैसे सहायता कर सकता हूँ?"


def turn(n: int, attempt: int = 1, text: str | None = None, conv: str = "c1", role: str | None = None,
         unprompted: bool = False) -> wire.TurnRecorded:
    """Turn ``n``; roles alternate from the customer unless ``role`` says otherwise."""
    return wire.TurnRecorded(batch_id="b1", conversation_id=conv, attempt=attempt, turn=n,
                        role=role or ("customer" if n % 2 == 0 else "support"),  # type: ignore[arg-type]
                        text=text if text is not None else f"turn {n} of attempt {attempt}",
                        started_at=1000.0 + n, ended_at=1000.5 + n, unprompted=unprompted)


# --------------------------------------------------------------------------- offer


def test_in_order_turns_are_written_first_one_replacing_the_empty_file() -> None:
    s: Transcript[str] = Transcript()
    step = offer(s, turn(0), "a0")
    assert (step.outcome, step.replace, [t.turn for t in step.lines], step.acks) == ("written", True, [0], ("a0",))
    step = offer(step.state, turn(1), "a1")
    assert (step.outcome, step.replace, [t.turn for t in step.lines], step.acks) == ("written", False, [1], ("a1",))
    assert (step.state.next_turn, step.state.file_lines, step.state.file_attempt) == (2, 2, 1)


def test_roles_need_not_alternate_a_target_may_speak_first_and_twice_in_a_row() -> None:
    """The user's own agent greets (turn 0, support, unprompted), answers, then follows up on its own."""
    said = [turn(0, role="support", text=HINDI, unprompted=True), turn(1, role="customer"),
            turn(2, role="support"), turn(3, role="support", unprompted=True), turn(4, role="customer")]
    s: Transcript[str] = Transcript()
    written: list[wire.TurnRecorded] = []
    for t in (said[1], said[0], said[3], said[2], said[4]):  # out of order: held until the gap fills
        step = offer(s, t, f"a{t.turn}")
        s, written = step.state, [*written, *step.lines]
    assert written == said  # in index order, whoever spoke
    lines = [core.decode_line(core.encode_line(t)) for t in written]
    assert [(x.role, x.unprompted, x.text) for x in lines] == [(t.role, t.unprompted, t.text) for t in said]
    # a redelivery of a stored support turn is a duplicate; another role at that index is a conflict
    assert offer(s, said[3], "again", stored=("support", said[3].text)).outcome == "duplicate"
    assert offer(s, turn(3, role="customer", text=said[3].text), "x", stored=("support", said[3].text)).outcome == (
        "conflict")


def test_duplicate_is_acked_without_a_line() -> None:
    s: Transcript[str] = Transcript.recovered(1, 3)
    step = offer(s, turn(1), "dup")
    assert (step.outcome, step.lines, step.acks, step.state) == ("duplicate", (), ("dup",), s)


def test_out_of_order_turns_are_held_then_written_as_one_run() -> None:
    s: Transcript[str] = Transcript.recovered(1, 1)
    step = offer(s, turn(3), "a3")
    assert (step.outcome, step.lines, step.acks) == ("held", (), ())
    step = offer(step.state, turn(2), "a2")
    assert step.outcome == "held"
    step = offer(step.state, turn(3), "a3-again")  # a redelivery of a held turn
    assert (step.outcome, step.acks) == ("duplicate", ())
    step = offer(step.state, turn(1), "a1")
    assert step.outcome == "written"
    assert [t.turn for t in step.lines] == [1, 2, 3]
    assert sorted(step.acks) == sorted(["a1", "a2", "a3", "a3-again"])
    assert step.state.held == {} and step.state.next_turn == 4 and not step.replace


def test_stale_attempt_is_dropped() -> None:
    s: Transcript[str] = Transcript.recovered(2, 5)
    step = offer(s, turn(5, attempt=1), "old")
    assert (step.outcome, step.lines, step.acks, step.state) == ("stale", (), ("old",), s)


def test_higher_attempt_replaces_the_file_and_releases_older_held_turns() -> None:
    s: Transcript[str] = Transcript.recovered(1, 4)
    s = offer(s, turn(6, attempt=1), "held-old").state
    step = offer(s, turn(1, attempt=2), "a2-1")  # new attempt, not yet its turn 0
    assert step.outcome == "held" and step.acks == ("held-old",)
    assert (step.state.attempt, step.state.file_attempt, step.state.file_lines) == (2, 1, 4)
    assert not step.state.holds(2, 1) and step.state.holds(1, 4)
    step = offer(step.state, turn(2, attempt=1), "late-old")
    assert step.outcome == "stale"
    step = offer(step.state, turn(0, attempt=2), "a2-0")
    assert step.replace and [t.turn for t in step.lines] == [0, 1]
    assert {t.attempt for t in step.lines} == {2}
    assert step.state.holds(2, 2) and not step.state.holds(1, 1)


def test_file_write_keeps_only_the_newest_attempt_of_one_commit() -> None:
    fw: FileWrite[str] = FileWrite()
    s: Transcript[str] = Transcript.recovered(1, 2)
    step = offer(s, turn(2), "x")
    fw.add(step)
    step = offer(step.state, turn(0, attempt=2), "y")
    fw.add(step)
    assert fw.replace and [(t.attempt, t.turn) for t in fw.lines] == [(2, 0)] and fw.acks == ["x", "y"]


def test_line_is_utf8_byte_exact_and_round_trips() -> None:
    t = turn(0, text=HINDI + ' "quoted" \\ and a\nnewline')
    line = core.encode_line(t)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert HINDI.encode("utf-8") in line  # raw UTF-8, not \u escapes
    back = core.decode_line(line)
    assert back.text == t.text and back.turn == 0 and back.attempt == 1
    assert list(msgspec.json.decode(line))[:6] == ["conversation_id", "turn", "role", "text", "started_at", "ended_at"]


def test_turn_problem_names_the_field() -> None:
    assert core.turn_problem(turn(0)) is None
    bad = [
        (msgspec.structs.replace(turn(0), batch_id="../etc"), "batch_id"),
        (msgspec.structs.replace(turn(0), batch_id="B1"), "batch_id"),
        (msgspec.structs.replace(turn(0), conversation_id="../../x"), "conversation_id"),
        (msgspec.structs.replace(turn(0), conversation_id="a.b"), "conversation_id"),
        (msgspec.structs.replace(turn(0), conversation_id=""), "conversation_id"),
        (msgspec.structs.replace(turn(0), attempt=0), "attempt"),
        (msgspec.structs.replace(turn(0), turn=-1), "turn"),
        (msgspec.structs.replace(turn(0), turn=core.MAX_TURN + 1), "turn"),
    ]
    for t, field in bad:
        problem = core.turn_problem(t)
        assert problem is not None and problem[0] == field, (t, problem)


# --------------------------------------------------------------------------- property: crashes


@settings(max_examples=300, deadline=None)
@given(
    attempts=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    crash_every=st.integers(min_value=0, max_value=15),
)
def test_any_order_duplicates_and_crashes_store_each_turn_once_in_order(
    attempts: list[int], seed: int, crash_every: int
) -> None:
    """Deliver every turn of every attempt, some twice, in a random order, crashing now
    and then (memory lost, file kept, unacked messages redelivered): the file ends as
    exactly the newest attempt's turns, once each, in order, and every message is acked."""
    rng = random.Random(seed)
    pending: list[tuple[wire.TurnRecorded, int]] = []  # (event, message id)
    mid = 0
    for a, count in enumerate(attempts, start=1):
        for n in range(count):
            for _ in range(rng.choice([1, 1, 2])):
                pending.append((turn(n, attempt=a), mid))
                mid += 1
    all_ids = {m for _, m in pending}
    rng.shuffle(pending)
    file: list[wire.TurnRecorded] = []
    acked: set[int] = set()
    in_flight: dict[int, wire.TurnRecorded] = {}  # delivered, not acked
    state: Transcript[int] = Transcript()
    steps = 0
    while pending or in_flight:
        if not pending:  # ack_wait expired: the server redelivers what was never acked
            pending = list((t, m) for m, t in in_flight.items())
            rng.shuffle(pending)
            in_flight.clear()
        event, m = pending.pop()
        in_flight[m] = event
        step = offer(state, event, m)
        state = step.state
        if step.replace:
            file = list(step.lines)
        else:
            file.extend(step.lines)
        for a in step.acks:
            acked.add(a)
            in_flight.pop(a, None)
        # invariant: the file is turns 0..n-1 of one attempt
        assert [t.turn for t in file] == list(range(len(file)))
        assert len({t.attempt for t in file}) <= 1
        steps += 1
        if crash_every and steps % crash_every == 0:
            state = Transcript.recovered(file[0].attempt if file else 0, len(file))
    newest = len(attempts)
    assert [(t.attempt, t.turn) for t in file] == [(newest, n) for n in range(attempts[-1])]
    assert acked == all_ids


# --------------------------------------------------------------------------- batch.json

SPEC = wire.BatchSpec(
    batch_id="b1", conversations=2, concurrency=2, scenario="hi-account-help", language="hi", max_turns=8, mode="text"
)


def batch_events() -> list[core.BatchDocEvent]:
    return [
        wire.BatchAccepted(spec=SPEC, at=10.0),
        wire.ConversationDispatched(batch_id="b1", conversation_id="c1", attempt=1, room="r1", at=11.0),
        wire.ConversationDispatched(batch_id="b1", conversation_id="c2", attempt=1, room="r2", at=11.0),
        wire.ConversationJoined(batch_id="b1", conversation_id="c1", attempt=1, join_seconds=0.5, at=12.0),
        wire.ConversationEnded(
            batch_id="b1", conversation_id="c1", attempt=1, room="r1", reason="max_turns", ok=True, turns=8, at=20.0
        ),
        wire.ConversationSettled(
            batch_id="b1", conversation_id="c1", attempt=1, outcome="completed", reason="max_turns", retry=False,
            turns=8, at=20.1,
        ),
        wire.ConversationSettled(
            batch_id="b1", conversation_id="c2", attempt=1, outcome="failed", reason="join_timeout", retry=True, at=21.0
        ),
        wire.ConversationDispatched(batch_id="b1", conversation_id="c2", attempt=2, room="r3", at=22.0),
        wire.ConversationEnded(
            batch_id="b1", conversation_id="c2", attempt=2, room="r3", reason="error:model", ok=False, turns=2, at=30.0
        ),
        wire.ConversationSettled(
            batch_id="b1", conversation_id="c2", attempt=2, outcome="failed", reason="agent_error:model",
            retry=False, turns=2, at=30.1,
        ),
        wire.BatchFinished(
            batch_id="b1", status="failed", requested=2, completed=1, failed=1, started_at=10.0, finished_at=31.0
        ),
    ]


def fold(events: list[core.BatchDocEvent], doc: BatchDoc | None = None) -> BatchDoc:
    doc = doc or BatchDoc(batch_id="b1")
    for e in events:
        doc = core.evolve(doc, e)
    return doc


def test_batch_doc_follows_the_batch() -> None:
    events = batch_events()
    running = fold(events[:7])
    assert running.status == "running" and running.requested == 2 and running.started_at == 10.0
    assert (running.scenario, running.language, running.mode, running.max_turns, running.concurrency) == (
        "hi-account-help", "hi", "text", 8, 2
    )
    assert running.completed == 1 and running.failed == 0  # a retried failure is not a failure yet
    assert running.conversations["c1"] == core.ConversationEntry(
        outcome="completed", reason="max_turns", attempts=1, turns=8, ended="max_turns"
    )
    assert running.conversations["c2"].outcome is None and running.conversations["c2"].attempts == 1
    done = fold(events)
    assert (done.status, done.completed, done.failed, done.finished_at) == ("failed", 1, 1, 31.0)
    assert done.conversations["c2"] == core.ConversationEntry(
        outcome="failed", reason="agent_error:model", attempts=2, turns=2, ended="error:model"
    )
    assert list(core.transcripts_expected(done)) == [("c1", 1, 8)]
    assert core.decode_doc(core.encode_doc(done)) == done


def test_an_event_that_changes_nothing_returns_the_same_doc() -> None:
    doc = fold(batch_events())
    for e in batch_events():
        assert core.evolve(doc, e) is doc


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=11), data=st.data())
def test_redelivered_events_never_change_a_recovered_doc(cut: int, data: st.DataObject) -> None:
    """A doc on disk reflecting the first ``cut`` events, then a redelivery of any of
    them (in any order) followed by the rest, ends as the doc of the plain sequence."""
    events = batch_events()
    on_disk = core.decode_doc(core.encode_doc(fold(events[:cut])))
    again = data.draw(st.lists(st.sampled_from(events[:cut]), max_size=8)) if cut else []
    assert fold(again + events[cut:], on_disk) == fold(events)


def test_final_settlement_of_an_older_attempt_does_not_overwrite_a_newer_one() -> None:
    newer = wire.ConversationSettled(
        batch_id="b1", conversation_id="c1", attempt=2, outcome="completed", reason="max_turns", retry=False,
        turns=4, at=2.0,
    )
    older = msgspec.structs.replace(newer, attempt=1, outcome="failed", reason="agent_left")
    doc = fold([newer, older])
    assert doc.conversations["c1"].outcome == "completed" and doc.conversations["c1"].attempts == 2


def test_event_problem_rejects_ids_that_would_reach_a_path() -> None:
    ok = wire.ConversationEnded(
        batch_id="b1", conversation_id="c1", attempt=1, room="r", reason="x", ok=True, turns=1, at=1.0
    )
    assert core.event_problem(ok) is None
    assert core.event_problem(msgspec.structs.replace(ok, batch_id="../x")) == (
        "batch_id", "must match [a-z0-9][a-z0-9-]{0,63}"
    )
    assert core.event_problem(msgspec.structs.replace(ok, conversation_id="a/b"))[0] == "conversation_id"  # type: ignore[index]
    bad_spec = wire.BatchAccepted(spec=msgspec.structs.replace(SPEC, batch_id="a*"), at=1.0)
    assert core.event_problem(bad_spec)[0] == "batch_id"  # type: ignore[index]


def test_short_transcripts_fail_their_conversations_and_the_batch_once() -> None:
    entry = core.ConversationEntry(outcome="completed", reason="end_conversation: support", attempts=1, turns=6)
    doc = BatchDoc(batch_id="b1", status="completed", requested=3, completed=3, failed=0,
                   conversations={"c1": entry, "c2": entry, "c3": msgspec.structs.replace(entry, outcome="failed")})
    marked = core.mark_incomplete(doc, {"c1": 4, "c3": 0, "nope": 1})
    assert (marked.status, marked.completed, marked.failed) == ("failed", 2, 1)
    assert marked.conversations["c1"].outcome == "failed"
    assert marked.conversations["c1"].reason == "transcript_incomplete: 4 of 6 turns stored"
    assert marked.conversations["c2"] == entry and marked.conversations["c3"].outcome == "failed"
    assert core.mark_incomplete(marked, {"c1": 4}) is marked  # idempotent
    assert core.mark_incomplete(doc, {}) is doc


# --------------------------------------------------------------------------- voice: attempts and faults


def metrics(attempt: int, seconds: float = 10.0) -> voice.VoiceMetrics:
    return voice.VoiceMetrics(
        recording="recordings/c1.wav", duration_s=seconds, heard_latency_s=[0.5], heard_latency_p50_s=0.5,
        heard_latency_p95_s=0.5, heard_latency_p99_s=0.5, overlap_ratio=0.0, awkward_silences=0,
        unanswered_turns=0, false_interruptions=0, time_to_first_audio_s=1.0, stt_wer=0.0, stt_words=4,
        heard_via={"stt": 2}, attempt=attempt)


def voice_batch(*convs: str) -> BatchDoc:
    spec = msgspec.structs.replace(SPEC, conversations=len(convs), mode="voice")
    return fold([wire.BatchAccepted(spec=spec, at=1.0)])


def settled(attempt: int, outcome: str = "completed", reason: str = "max_turns", retry: bool = False,
            conv: str = "c1") -> wire.ConversationSettled:
    return wire.ConversationSettled(batch_id="b1", conversation_id=conv, attempt=attempt, outcome=outcome,  # type: ignore[arg-type]
                               reason=reason, retry=retry, turns=4 if outcome == "completed" else 0, at=2.0)


def finished(completed: int, failed: int) -> wire.BatchFinished:
    return wire.BatchFinished(batch_id="b1", status="completed" if not failed else "failed", requested=completed + failed,
                         completed=completed, failed=failed, started_at=1.0, finished_at=9.0)


def test_a_failed_attempts_late_recording_never_replaces_the_settled_ones() -> None:
    """Attempt 1 failed and was retried; attempt 2 completed and was recorded; attempt 1's channels
    arrive last: its figures (and so its WAV, services/sink/recordings.py) are refused."""
    doc = fold([settled(1, "failed", "agent_left", retry=True),
                wire.ConversationDispatched(batch_id="b1", conversation_id="c1", attempt=2, room="b1--c1--2", at=3.0),
                settled(2)], voice_batch("c1"))
    doc = core.set_voice(doc, "c1", metrics(2))
    assert core.set_voice(doc, "c1", metrics(1, seconds=99.0)) is doc
    assert batch_doc.stale_recording(doc.conversations["c1"], 1) and not batch_doc.stale_recording(doc.conversations["c1"], 2)
    assert doc.voice is not None and doc.voice.conversations == 1


def test_an_older_attempts_figures_leave_when_a_newer_attempt_starts() -> None:
    doc = core.set_voice(voice_batch("c1"), "c1", metrics(1))
    assert doc.conversations["c1"].voice is not None
    doc = fold([settled(1, "failed", "agent_left", retry=True),
                wire.ConversationDispatched(batch_id="b1", conversation_id="c1", attempt=2, room="b1--c1--2", at=3.0)],
               doc)
    assert doc.conversations["c1"].voice is None and doc.voice is not None and doc.voice.conversations == 0


def test_a_completed_voice_conversation_without_its_recording_is_recording_missing() -> None:
    doc = fold([settled(1, conv="c1"), settled(1, conv="c2")], voice_batch("c1", "c2"))
    doc = core.set_voice(doc, "c1", metrics(1))
    assert batch_doc.recordings_missing(doc) == ["c2"]  # what a wire.BatchFinished could wait for
    done = core.evolve(doc, finished(2, 0))
    c2 = done.conversations["c2"]
    assert c2.outcome == "failed" and c2.reason is not None and c2.reason.startswith("recording_missing: ")
    assert batch_doc.voice_fault(c2) == "recording_missing"
    assert (done.status, done.completed, done.failed) == ("failed", 1, 1)
    assert done.voice is not None and done.voice.recording_missing == 1 and done.voice.conversations == 1
    assert core.evolve(done, finished(2, 0)) == done  # redelivered: the same document
    assert core.decode_doc(core.encode_doc(done)) == done
    # the recording arrives after all: completed again, counted as recorded
    late = core.set_voice(done, "c2", metrics(1))
    assert late.conversations["c2"].outcome == "completed" and late.conversations["c2"].reason == "max_turns"
    assert (late.status, late.completed, late.failed) == ("completed", 2, 0)
    assert late.voice is not None and late.voice.recording_missing == 0 and late.voice.conversations == 2
    assert core.evolve(late, finished(2, 0)) == late


def test_text_batches_and_failed_conversations_have_no_recording_to_miss() -> None:
    text = fold([*batch_events()])
    assert batch_doc.mark_recording_missing(text) is text
    doc = fold([settled(1, "failed", "agent_left"), finished(0, 1)], voice_batch("c1"))
    assert doc.conversations["c1"].reason == "agent_left" and (doc.completed, doc.failed) == (0, 1)


def test_no_audio_is_counted_by_name_even_behind_the_dispatchers_other_label() -> None:
    doc = fold([settled(1, "failed", "no_audio: the support heard no speech", conv="c1"),
                settled(1, "failed", "other: no_audio: the customer heard no speech", conv="c2"),
                settled(1, "failed", "target_silent: agent 'x' sent no audio", conv="c3")], voice_batch("c1", "c2", "c3"))
    assert doc.voice is not None and (doc.voice.no_audio, doc.voice.recording_missing) == (2, 0)
    assert batch_doc.voice_fault(doc.conversations["c3"]) is None  # the agent's own failure, not crosstalk's
