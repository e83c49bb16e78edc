"""lk perf agent-load-test output parsing (benchmarks/lk_compare.py), on output captured from real runs.

The captured texts are lk v2.16.3 against livekit-server v1.13.5 on this machine with
benchmarks/echo_agent.py: a server with room.auto_create false (every join "not found"), a
3-room run cut short by --duration (the last agent not seen yet), and a full 6-room run.
"""

from __future__ import annotations

import pytest

from benchmarks import lk_compare
from benchmarks.lk_compare import (
    LkOutputError,
    LkRoom,
    parse_go_duration,
    parse_output,
    parse_table,
)

AUTO_CREATE_OFF_STDOUT = '\nTest Statistics:\n┌───┬──────┬──────────────────────┬──────────────┬──────────────────┬────────────────────────┬──────────────────────┐\n│ # │ Room │ Agent Dispatched At  │ Agent Joined │ Agent Join Delay │ Agent Track Subscribed │ Echo Track Published │\n├───┼──────┼──────────────────────┼──────────────┼──────────────────┼────────────────────────┼──────────────────────┤\n│ 1 │      │ 0001-01-01T00:00:00Z │ ✗            │ -                │ ✗                      │ ✗                    │\n└───┴──────┴──────────────────────┴──────────────┴──────────────────┴────────────────────────┴──────────────────────┘\n'
AUTO_CREATE_OFF_STDERR = '2026-11-25T17:21:59.281Z\tINFO\tStarting agent load test with 2 rooms\n2026-11-25T17:21:59.285Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 1): not found\n2026-11-25T17:22:00.289Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 2): not found\n2026-11-25T17:22:01.293Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 3): not found\n2026-11-25T17:22:02.298Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 4): not found\n2026-11-25T17:22:03.301Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 5): not found\n2026-11-25T17:22:04.304Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 6): not found\n2026-11-25T17:22:05.307Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 7): not found\n2026-11-25T17:22:06.309Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 8): not found\n2026-11-25T17:22:07.312Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 9): not found\n2026-11-25T17:22:08.315Z\tINFO\tFailed to join room room-0-bKm38z4Ew5P7 (attempt 10): not found\n2026-11-25T17:22:09.310Z\tINFO\tTest completed or timed out\n'
CUT_SHORT_STDOUT = '\nTest Statistics:\n┌───┬─────────────────────┬──────────────────────┬──────────────┬──────────────────┬────────────────────────┬──────────────────────┐\n│ # │ Room                │ Agent Dispatched At  │ Agent Joined │ Agent Join Delay │ Agent Track Subscribed │ Echo Track Published │\n├───┼─────────────────────┼──────────────────────┼──────────────┼──────────────────┼────────────────────────┼──────────────────────┤\n│ 1 │ room-0-FoxijJS2KnYC │ 2026-11-25T17:23:32Z │ ✓            │ 2.959084286s     │ ✗                      │ ✓                    │\n│ 2 │ room-1-WN9zyt7TQDuj │ 2026-11-25T17:23:35Z │ ✓            │ 342.270847ms     │ ✗                      │ ✓                    │\n│ 3 │ room-2-YJjn5C4ju9AU │ 2026-11-25T17:23:36Z │ ✗            │ -                │ ✗                      │ ✓                    │\n└───┴─────────────────────┴──────────────────────┴──────────────┴──────────────────┴────────────────────────┴──────────────────────┘\n'
CUT_SHORT_STDERR = '2026-11-25T17:23:32.603Z\tINFO\tStarting agent load test with 3 rooms\n2026-11-25T17:23:38.604Z\tINFO\tContext cancelled for room room-2-YJjn5C4ju9AU, cleaning up\n2026-11-25T17:23:38.604Z\tINFO\tContext cancelled for room room-0-FoxijJS2KnYC, cleaning up\n2026-11-25T17:23:38.605Z\tINFO\tContext cancelled for room room-1-WN9zyt7TQDuj, cleaning up\n2026-11-25T17:23:38.630Z\tINFO\tTest completed or timed out\n'
SIX_ROOMS_STDOUT = '\nTest Statistics:\n┌───┬─────────────────────┬──────────────────────┬──────────────┬──────────────────┬────────────────────────┬──────────────────────┐\n│ # │ Room                │ Agent Dispatched At  │ Agent Joined │ Agent Join Delay │ Agent Track Subscribed │ Echo Track Published │\n├───┼─────────────────────┼──────────────────────┼──────────────┼──────────────────┼────────────────────────┼──────────────────────┤\n│ 1 │ room-0-68VLd2gcKUzb │ 2026-11-25T17:24:31Z │ ✓            │ 2.98408203s      │ ✗                      │ ✓                    │\n│ 2 │ room-1-Hu5M8pp8EEgj │ 2026-11-25T17:24:34Z │ ✓            │ 320.941652ms     │ ✗                      │ ✓                    │\n│ 3 │ room-2-zZEQXeaDU3B6 │ 2026-11-25T17:24:35Z │ ✓            │ 357.698678ms     │ ✗                      │ ✓                    │\n│ 4 │ room-3-ioHg8pNecbAz │ 2026-11-25T17:24:35Z │ ✓            │ 2.978929247s     │ ✗                      │ ✓                    │\n│ 5 │ room-4-NhqqVsD92vLC │ 2026-11-25T17:24:38Z │ ✓            │ 391.115657ms     │ ✗                      │ ✓                    │\n│ 6 │ room-5-46Smo8fDQ2Sj │ 2026-11-25T17:24:39Z │ ✓            │ 362.898471ms     │ ✗                      │ ✓                    │\n└───┴─────────────────────┴──────────────────────┴──────────────┴──────────────────┴────────────────────────┴──────────────────────┘\n'


def test_parses_every_row_of_a_full_run() -> None:
    rows = parse_table(SIX_ROOMS_STDOUT)
    assert [r.index for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0] == LkRoom(index=1, room="room-0-68VLd2gcKUzb", dispatched_at="2026-11-25T17:24:31Z",
                             agent_joined=True, join_delay_s=pytest.approx(2.98408203),
                             agent_track_subscribed=False, echo_track_published=True)
    assert rows[1].join_delay_s == pytest.approx(0.320941652)
    assert all(r.agent_joined and r.echo_track_published for r in rows)


def test_summary_quantiles_and_counts_of_a_full_run() -> None:
    s = lk_compare.summarize(parse_output(SIX_ROOMS_STDOUT, ""), rooms_requested=6)
    assert (s["rooms"], s["rooms_started"], s["rooms_dispatched"], s["agents_joined"]) == (6, 6, 6, 6)
    assert s["echo_tracks_published"] == 6 and s["agent_tracks_subscribed"] == 0
    d = s["join_delay_s"]
    assert d["n"] == 6
    # nearest rank over sorted [0.321, 0.358, 0.363, 0.391, 2.979, 2.984]
    assert (d["p50"], d["p95"], d["p99"]) == (0.3629, 2.9841, 2.9841)
    assert (d["min"], d["max"]) == (0.3209, 2.9841)
    assert s["joins_over_2_5_s"] == 2
    assert s["rooms_failed"] == [] and s["join_retries"] == 0


def test_a_run_cut_short_counts_the_room_whose_agent_was_not_seen() -> None:
    out = parse_output(CUT_SHORT_STDOUT, CUT_SHORT_STDERR)
    assert out.rooms[2].agent_joined is False and out.rooms[2].join_delay_s is None
    assert out.failures == []
    s = lk_compare.summarize(out, rooms_requested=3)
    assert (s["rooms_started"], s["rooms_dispatched"], s["agents_joined"]) == (3, 3, 2)
    assert s["join_delay_s"]["n"] == 2
    assert (s["join_delay_s"]["p50"], s["join_delay_s"]["p99"]) == (0.3423, 2.9591)


def test_auto_create_off_reads_as_failed_joins_and_says_why() -> None:
    out = parse_output(AUTO_CREATE_OFF_STDOUT, AUTO_CREATE_OFF_STDERR)
    (row,) = out.rooms
    assert row.room == "" and row.dispatched_at is None and not row.agent_joined
    assert len(out.failures) == 10
    assert {(f.room, f.step, f.error) for f in out.failures} == {("room-0-bKm38z4Ew5P7", "join", "not found")}
    s = lk_compare.summarize(out, rooms_requested=2)
    assert (s["rooms_started"], s["agents_joined"], s["join_retries"]) == (0, 0, 10)
    assert s["join_delay_s"]["p99"] is None
    assert "auto_create" in lk_compare.explain_no_joins(out, AUTO_CREATE_OFF_STDERR)


def test_steps_that_gave_up_are_listed_per_room() -> None:
    stderr = (
        "2026-11-25T17:22:08.315Z\tINFO\tFailed to connect to room room-3-abc: websocket: bad handshake\n"
        "2026-11-25T17:22:08.315Z\tINFO\tFailed to dispatch agent to room room-4-def: twirp error unavailable\n"
        "2026-11-25T17:22:08.315Z\tINFO\tFailed to publish echo track to room room-5-ghi: timeout\n"
    )
    out = parse_output("", stderr)
    assert [(f.room, f.step) for f in out.failures] == [
        ("room-3-abc", "connect"), ("room-4-def", "dispatch agent"), ("room-5-ghi", "publish echo track")]
    assert lk_compare.summarize(out, 6)["rooms_failed"] == ["room-3-abc", "room-4-def", "room-5-ghi"]
    assert "no statistics table" in lk_compare.explain_no_joins(out, stderr)


def test_ansi_colours_are_ignored() -> None:
    coloured = SIX_ROOMS_STDOUT.replace("✓", "\x1b[32m✓\x1b[0m").replace("✗", "\x1b[31m✗\x1b[0m")
    assert parse_table(coloured) == parse_table(SIX_ROOMS_STDOUT)


@pytest.mark.parametrize(("text", "seconds"), [
    ("2.98408203s", 2.98408203), ("342.270847ms", 0.342270847), ("850µs", 850e-6), ("850us", 850e-6),
    ("12ns", 12e-9), ("0s", 0.0), ("1m2.5s", 62.5), ("1h0m0.5s", 3600.5), ("-1.5ms", -0.0015),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "3", "2.5 s", "fast", "1.2.3s", "5d", "s"])
def test_bad_durations_name_the_column(text: str) -> None:
    with pytest.raises(LkOutputError) as exc:
        parse_go_duration(text)
    assert exc.value.field == "Agent Join Delay"


def test_a_row_of_the_wrong_shape_names_the_field() -> None:
    header = SIX_ROOMS_STDOUT.splitlines()[3]
    with pytest.raises(LkOutputError) as exc:
        parse_table(header + "\n│ 1 │ room-0 │ 2026-11-25T17:24:31Z │ yes │ 1s │ ✗ │ ✓ │\n")
    assert exc.value.field == "Agent Joined"
    with pytest.raises(LkOutputError) as exc:
        parse_table(header + "\n│ 1 │ room-0 │ 1s │\n")
    assert exc.value.field == "row"
    with pytest.raises(LkOutputError) as exc:
        parse_table("│ 1 │ room-0 │ 2026-11-25T17:24:31Z │ ✓ │ 1s │ ✗ │ ✓ │\n")
    assert exc.value.field == "table"


def test_no_table_is_no_rows() -> None:
    assert parse_table("") == []
    assert parse_table("2026-11-25T17:22:20.096Z\tINFO\tStarting agent load test with 3 rooms\n") == []


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rooms": 0}, "rooms"), ({"agent_name": " "}, "agent_name"), ({"duration_s": 0}, "duration_s"),
])
def test_bad_arguments_are_refused_before_anything_starts(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"livekit_url": "ws://127.0.0.1:1", "api_key": "k", "api_secret": "s",
                               "rooms": 2, "duration_s": 10, "agent_name": "lk-echo", **kwargs}
    with pytest.raises(ValueError, match=f"^{field}:"):
        lk_compare.run_lk_agent_load_test(**args)  # type: ignore[arg-type]
