"""The transcript sink in-process against a real nats-server: files, batch.json, bad ids, recovery."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext
from support.harness import wait_for
from support.leases import Leases
from support.sink import drained, running_sink

from services.sink import core
from shared import bus, streams, subjects
from shared.contracts import (
    BatchAccepted,
    BatchFinished,
    BatchSpec,
    ConversationDispatched,
    ConversationEnded,
    ConversationSettled,
    TurnRecorded,
)

HINDI = "नमस्ते! मैं आपके खाते में लॉग-इन की समस्या में मदद करूँगा।"
HINGLISH = "Haan ji, mera refund abhi tak नहीं आया hai 🙏"


@asynccontextmanager
async def publisher(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(nats_url, "test-publisher")
    try:
        yield await bus.jetstream(nc)
    finally:
        await nc.drain()


def turn(batch: str, conv: str, n: int, attempt: int = 1, text: str | None = None) -> TurnRecorded:
    return TurnRecorded(
        batch_id=batch, conversation_id=conv, attempt=attempt, turn=n,
        role="customer" if n % 2 == 0 else "support",
        text=text if text is not None else f"{conv} turn {n} attempt {attempt}",
        started_at=1_700_000_000.0 + n, ended_at=1_700_000_000.5 + n, first_token_s=0.12, total_s=0.4,
        language="hi",
    )


LEASES = Leases()


async def pub_turn(js: JetStreamContext, t: TurnRecorded, *, lease: bool = True) -> None:
    """Publish a turn; ``lease``: with a live lease of its role in its room (a grant on ROLES)."""
    if lease and t.lease is None:
        t = await LEASES.leased(js, t)
    await bus.publish(js, subjects.conv_event(t.batch_id, t.conversation_id, "turn"), t)


def lines(path: Path) -> list[core.TurnLine]:
    return [core.decode_line(raw) for raw in path.read_bytes().splitlines()]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def glob(root: Path, pattern: str) -> list[Path]:
    return list(root.glob(pattern))


def read_doc(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def spec(batch: str, n: int) -> BatchSpec:
    return BatchSpec(
        batch_id=batch, conversations=n, concurrency=n, scenario="hi-account-help", language="hi", max_turns=8,
        mode="text",
    )


def settled(batch: str, conv: str, turns: int, attempt: int = 1) -> ConversationSettled:
    return ConversationSettled(
        batch_id=batch, conversation_id=conv, attempt=attempt, outcome="completed", reason="max_turns",
        retry=False, turns=turns, at=1_700_000_100.0,
    )


async def test_turns_out_of_order_and_duplicated_land_once_and_batch_json_waits_for_them(
    nats_url: str, tmp_path: Path, unique: str
) -> None:
    b = f"b-{unique}"
    async with running_sink(nats_url, tmp_path, f"sink-{unique}") as sink, publisher(nats_url) as js:
        await bus.publish(js, subjects.batch_events(b), BatchAccepted(spec=spec(b, 2), at=1_700_000_000.0))
        await bus.publish(
            js, subjects.batch_events(b),
            ConversationDispatched(batch_id=b, conversation_id="c1", attempt=1, room=f"{b}-c1", at=1.0),
        )
        texts = {0: HINDI, 1: "Sure, what is your account number?", 2: HINGLISH, 3: "धन्यवाद"}
        for n in (2, 0, 1, 1, 3, 0):
            await pub_turn(js, turn(b, "c1", n, text=texts[n]))
        for n in (1, 0):
            await pub_turn(js, turn(b, "c2", n))
        await bus.publish(
            js, subjects.conv_event(b, "c1", "ended"),
            ConversationEnded(batch_id=b, conversation_id="c1", attempt=1, room=f"{b}-c1", reason="max_turns",
                              ok=True, turns=4, at=2.0),
        )
        await bus.publish(js, subjects.batch_events(b), settled(b, "c1", 4))
        await bus.publish(js, subjects.batch_events(b), settled(b, "c2", 3))  # c2's turn 2 is not out yet
        finished = BatchFinished(batch_id=b, status="completed", requested=2, completed=2, failed=0,
                                 started_at=1_700_000_000.0, finished_at=1_700_000_200.0)
        await bus.publish(js, subjects.batch_events(b), finished)

        batch_json = tmp_path / "batches" / b / "batch.json"
        doc = await wait_for(
            lambda: (d := read_doc(batch_json)) and d["conversations"].get("c2", {}).get("outcome") and d,
            what="settlements in batch.json",
        )
        c1 = tmp_path / "batches" / b / "conversations" / "c1.jsonl"
        await wait_for(lambda: c1.exists() and len(lines(c1)) == 4, what="c1 transcript")
        await asyncio.sleep(1.5)  # BatchFinished has come and gone (nak'ed) meanwhile
        doc = read_doc(batch_json)
        assert doc is not None and doc["status"] == "running" and doc["finished_at"] is None

        await pub_turn(js, turn(b, "c2", 2))
        doc = await wait_for(
            lambda: (d := read_doc(batch_json)) and d["status"] == "completed" and d, what="batch completed"
        )
        await wait_for(lambda: drained(sink), what="consumers drained")

        assert [(t.turn, t.text) for t in lines(c1)] == sorted(texts.items())
        raw = c1.read_bytes()
        for text in texts.values():
            assert raw.count(text.encode("utf-8")) == 1  # byte-exact, stored once
        first = json.loads(raw.splitlines()[0])
        assert list(first)[:8] == [
            "conversation_id", "turn", "role", "text", "started_at", "ended_at", "attempt", "batch_id"
        ]
        assert (first["first_token_s"], first["total_s"], first["role"]) == (0.12, 0.4, "customer")
        c2 = tmp_path / "batches" / b / "conversations" / "c2.jsonl"
        assert [t.turn for t in lines(c2)] == [0, 1, 2]

        assert doc["batch_id"] == b and doc["requested"] == 2 and doc["completed"] == 2 and doc["failed"] == 0
        assert (doc["started_at"], doc["finished_at"]) == (1_700_000_000.0, 1_700_000_200.0)
        assert (doc["scenario"], doc["language"], doc["mode"], doc["max_turns"], doc["concurrency"]) == (
            "hi-account-help", "hi", "text", 8, 2
        )
        assert {k: doc["conversations"]["c1"][k] for k in ("outcome", "reason", "attempts", "turns", "ended",
                                                           "conflicts")} == {
            "outcome": "completed", "reason": "max_turns", "attempts": 1, "turns": 4, "ended": "max_turns",
            "conflicts": 0,
        }
        assert sink.metrics.turns_written._value.get() == 7
        assert sink.metrics.duplicates._value.get() == 2
        assert sorted(p.name for p in (tmp_path / "batches" / b).rglob("*")) == [
            "batch.json", "c1.jsonl", "c2.jsonl", "conversations"
        ]


async def test_a_retried_attempt_replaces_the_transcript(nats_url: str, tmp_path: Path, unique: str) -> None:
    b = f"b-{unique}"
    async with running_sink(nats_url, tmp_path, f"sink-{unique}") as sink, publisher(nats_url) as js:
        for n in range(4):
            await pub_turn(js, turn(b, "c1", n, attempt=1))
        await pub_turn(js, turn(b, "c1", 5, attempt=1))  # held: turn 4 never comes, the attempt died
        path = tmp_path / "batches" / b / "conversations" / "c1.jsonl"
        await wait_for(lambda: path.exists() and len(lines(path)) == 4, what="attempt 1")
        before = path.stat().st_ino
        for n, a in [(1, 2), (0, 2), (4, 1), (0, 1), (2, 2), (2, 2)]:
            await pub_turn(js, turn(b, "c1", n, attempt=a, text=f"{HINDI} #{a}.{n}"))
        await wait_for(lambda: [(t.attempt, t.turn) for t in lines(path)] == [(2, 0), (2, 1), (2, 2)],
                       what="attempt 2 only")
        await wait_for(lambda: drained(sink), what="all acked, stale and held included")
        assert path.stat().st_ino != before  # replaced (rename), never rewritten in place
        assert [t.text for t in lines(path)] == [f"{HINDI} #2.{n}" for n in range(3)]
        assert sink.metrics.dropped.labels("stale_attempt")._value.get() == 2
        assert sorted(p.name for p in path.parent.iterdir()) == ["c1.jsonl"]


async def test_bad_ids_and_bodies_are_dropped_and_nothing_leaves_the_data_dir(
    nats_url: str, tmp_path: Path, unique: str
) -> None:
    b = f"b-{unique}"
    data = tmp_path / "data"
    good = msgspec.to_builtins(turn(b, "c1", 0))
    good["type"] = "turn"

    def body(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}, ensure_ascii=False).encode()

    conv_subject = subjects.conv_event(b, "c1", "turn")
    bad_conv: list[tuple[str, bytes]] = [
        (conv_subject, body(conversation_id="../../../outside")),
        (conv_subject, body(conversation_id="../../../../../../tmp/pwn-" + unique)),
        (conv_subject, body(conversation_id="a/b")),
        (conv_subject, body(conversation_id=".hidden")),
        (conv_subject, body(conversation_id="c1\n")),
        (conv_subject, body(batch_id="..")),
        (conv_subject, body(batch_id="../data")),
        (conv_subject, body(batch_id=b + "/x")),
        (subjects.conv_event(b, "c2", "turn"), body()),  # payload and subject disagree
        (conv_subject, body(attempt=0)),
        (conv_subject, body(turn=-1)),
        (conv_subject, body(turn="0")),
        (conv_subject, body(text=None)),
        (conv_subject, body(type="nope")),
        (conv_subject, b"not json"),
        (conv_subject, b"\xff\xfe"),
        (conv_subject, json.dumps({**good, "conversation_id": "../x", "type": "conversation_ended", "room": "r",
                                   "reason": "x", "ok": True, "turns": 1, "at": 1.0}).encode()),
    ]
    evt_subject = subjects.batch_events(b)
    accepted = msgspec.to_builtins(BatchAccepted(spec=spec(b, 1), at=1.0))
    accepted["type"] = "batch_accepted"
    bad_batch: list[tuple[str, bytes]] = [
        (evt_subject, json.dumps({**accepted, "spec": {**accepted["spec"], "batch_id": "../../x"}}).encode()),
        (evt_subject, json.dumps({**accepted, "spec": {**accepted["spec"], "batch_id": "other"}}).encode()),
        (evt_subject, json.dumps({"type": "batch_finished", "batch_id": "../.."}).encode()),
        (evt_subject, b"{}"),
        (evt_subject, b"[1,2]"),
    ]
    # A batch directory someone symlinked out of the data dir: valid ids, still refused.
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "batches").mkdir(parents=True)
    evil = f"evil-{unique}"
    (data / "batches" / evil).symlink_to(outside, target_is_directory=True)
    via_symlink = [
        (subjects.conv_event(evil, "c1", "turn"), msgspec.json.encode(turn(evil, "c1", 0))),
        (subjects.batch_events(evil), msgspec.json.encode(BatchAccepted(spec=spec(evil, 1), at=1.0))),
    ]
    async with running_sink(nats_url, data, f"sink-{unique}") as sink, publisher(nats_url) as js:
        for subject, payload in bad_conv + bad_batch + via_symlink:
            await bus.publish(js, subject, payload)
        await pub_turn(js, turn(b, "c1", 0, text=HINDI))  # the sink is still there
        await bus.publish(js, evt_subject, BatchAccepted(spec=spec(b, 1), at=1.0))
        await wait_for(lambda: (data / "batches" / b / "batch.json").exists(), what="batch.json")
        await wait_for(lambda: drained(sink), what="bad events acked")
        dropped = len(bad_conv) + len(bad_batch) + len(via_symlink)
        assert sink.metrics.dropped.labels("invalid")._value.get() == dropped
    assert tree(tmp_path) == [
        "data", "data/batches", f"data/batches/{b}", f"data/batches/{b}/batch.json",
        f"data/batches/{b}/conversations", f"data/batches/{b}/conversations/c1.jsonl", f"data/batches/{evil}",
        "outside",
    ]
    assert not glob(Path("/tmp"), f"pwn-{unique}*")
    assert [t.text for t in lines(data / "batches" / b / "conversations" / "c1.jsonl")] == [HINDI]


async def test_restart_over_files_left_mid_write_keeps_each_turn_once(
    nats_url: str, tmp_path: Path, unique: str
) -> None:
    """A sink killed after writing turns 0-2 but before acking them, and mid-way through
    turn 3's line: the next sink cuts the partial line and treats 0-2 as duplicates."""
    b = f"b-{unique}"
    path = tmp_path / "batches" / b / "conversations" / "c1.jsonl"
    path.parent.mkdir(parents=True)
    written = b"".join(core.encode_line(turn(b, "c1", n, text=f"{HINDI} {n}")) for n in range(3))
    path.write_bytes(written + core.encode_line(turn(b, "c1", 3, text=f"{HINDI} 3"))[:-20])
    async with running_sink(nats_url, tmp_path, f"sink-{unique}") as sink, publisher(nats_url) as js:
        for n in [0, 1, 2, 3, 4, 5]:  # 0-2: the redeliveries of what was never acked
            await pub_turn(js, turn(b, "c1", n, text=f"{HINDI} {n}"))
        await wait_for(lambda: len(lines(path)) == 6, what="6 lines")
        await wait_for(lambda: drained(sink), what="drained")
        assert sink.metrics.duplicates._value.get() == 3
    assert path.read_bytes().startswith(written)
    assert [(t.turn, t.text) for t in lines(path)] == [(n, f"{HINDI} {n}") for n in range(6)]


async def test_batch_json_is_always_whole_while_it_is_rewritten(nats_url: str, tmp_path: Path, unique: str) -> None:
    b = f"b-{unique}"
    path = tmp_path / "batches" / b / "batch.json"
    seen: list[dict[str, Any]] = []
    errors: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                seen.append(json.loads(raw))
            except ValueError as exc:
                errors.append(f"{exc}: {raw[-80:]!r}")

    n = 300
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        async with running_sink(nats_url, tmp_path, f"sink-{unique}", flush_interval_s=0.02) as sink, \
                publisher(nats_url) as js:
            await bus.publish(js, subjects.batch_events(b), BatchAccepted(spec=spec(b, n), at=1.0))
            for i in range(n):
                conv = f"c{i:03d}"
                await bus.publish(js, subjects.batch_events(b), ConversationDispatched(
                    batch_id=b, conversation_id=conv, attempt=1, room=conv, at=2.0))
                await bus.publish(js, subjects.batch_events(b), ConversationSettled(
                    batch_id=b, conversation_id=conv, attempt=1, outcome="failed", reason="join_timeout",
                    retry=False, at=3.0))
            await bus.publish(js, subjects.batch_events(b), BatchFinished(
                batch_id=b, status="failed", requested=n, completed=0, failed=n, started_at=1.0, finished_at=4.0))
            await wait_for(lambda: (d := read_doc(path)) and d["status"] == "failed", what="finished")
            await wait_for(lambda: drained(sink), what="drained")
    finally:
        done.set()
        thread.join()
    assert not errors, errors[:3]
    assert len(seen) > 1
    final = read_doc(path)
    assert final is not None and final["failed"] == n and len(final["conversations"]) == n
    keys = ("outcome", "reason", "attempts", "turns", "ended")
    assert all({k: e[k] for k in keys} == {"outcome": "failed", "reason": "join_timeout", "attempts": 1,
                                           "turns": 0, "ended": None}
               for e in final["conversations"].values())
    # counts only ever grow while running: each version is a consistent snapshot
    fails = [d["failed"] for d in seen if d["status"] == "running"]
    assert fails == sorted(fails)
    assert sorted(p.name for p in path.parent.iterdir()) == ["batch.json"]


async def test_a_batch_with_a_short_transcript_is_not_completed_and_names_the_conversation(
    nats_url: str, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    b = f"b-{unique}"
    async with running_sink(nats_url, tmp_path, f"sink-{unique}", finish_retry_s=0.2,
                            finish_max_deliveries=4) as sink, publisher(nats_url) as js:
        await bus.publish(js, subjects.batch_events(b), settled(b, "c1", 3))
        await pub_turn(js, turn(b, "c1", 0))  # turns 1 and 2 never arrive
        await bus.publish(js, subjects.batch_events(b), BatchFinished(
            batch_id=b, status="completed", requested=1, completed=1, failed=0, started_at=1.0, finished_at=2.0))
        path = tmp_path / "batches" / b / "batch.json"
        # the dispatcher said completed; the files say otherwise, and the files win: never "completed" short
        doc = await wait_for(lambda: (d := read_doc(path)) and d["status"] != "running" and d, what="finished")
        assert (doc["status"], doc["completed"], doc["failed"]) == ("failed", 0, 1)
        entry = doc["conversations"]["c1"]
        assert (entry["outcome"], entry["reason"]) == ("failed", "transcript_incomplete: 1 of 3 turns stored")
        assert sink.metrics.incomplete._value.get() == 1
        info = await sink.js.consumer_info(streams.BATCH_EVENTS.name, sink.consumers.batch.name)
        assert info.delivered.consumer_seq >= 2 + 3  # BatchFinished was held back 3 times first
        warned = [r for r in caplog.records
                  if r.getMessage() == "batch finished with transcripts still short: failing those conversations"]
        assert warned and warned[0].fields["conversations"] == ["c1"]  # type: ignore[attr-defined]
