"""A batch's results as the stack leaves them: its BatchFinished event, batch.json (and its room
audit), each transcript, read and checked the way every e2e module reads them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from shared import subjects
from shared.contracts import BatchEvent, BatchFinished, decode_event
from shared.rooms import room_name


async def wait_finished(js: Any, batch_id: str, timeout: float = 300) -> BatchFinished:
    subject = subjects.batch_events(batch_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = await js.get_last_msg("BATCH_EVENTS", subject)
            ev = decode_event(msg.data, BatchEvent)
            if isinstance(ev, BatchFinished):
                return ev
        except Exception:  # not there yet
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"batch {batch_id} did not finish in {timeout}s")


def read_batch(stack: Any, batch_id: str, timeout: float = 60) -> dict[str, Any]:
    """batch.json once the sink says the batch is over (it waits for every transcript line)."""
    path = stack.data_dir / "batches" / batch_id / "batch.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            data = json.loads(path.read_bytes())
            if data.get("status") in ("completed", "failed"):
                return data
        time.sleep(0.3)
    raise AssertionError(f"{path} never reached a final status")


def read_turns(stack: Any, batch_id: str, conversation_id: str) -> list[dict[str, Any]]:
    path = stack.data_dir / "batches" / batch_id / "conversations" / f"{conversation_id}.jsonl"
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def check_transcript(turns: list[dict[str, Any]], conversation_id: str, max_turns: int) -> None:
    assert turns, f"{conversation_id}: no turns"
    assert [t["turn"] for t in turns] == list(range(len(turns))), "turns contiguous from 0"
    assert turns[0]["role"] == "customer", "customer speaks first"
    for a, b in zip(turns, turns[1:], strict=False):
        assert a["role"] != b["role"], "roles alternate"
        assert a["ended_at"] <= b["ended_at"]
    assert len(turns) <= max_turns
    assert all(t["conversation_id"] == conversation_id and t["text"] for t in turns)


def read_audit(stack: Any, batch_id: str, timeout: float = 90) -> dict[str, Any]:
    """batch.json once its room audit has settled: every conversation's last room reported
    finished by livekit-server's webhooks and every participant reported gone (webhooks and
    grants reach the sink on their own streams, maybe after the batch finished)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = read_batch(stack, batch_id)
        convs = batch["conversations"]
        unsettled = [
            cid for cid, c in convs.items()
            if not any(r["room"] == room_name(cid, c["attempts"]) and r.get("finished_at") for r in c.get("rooms", []))
            or not all(p.get("left_at") for p in c.get("participants", []))
        ]
        if not unsettled:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"room audit never settled for {len(unsettled)} conversation(s): {unsettled[:5]}")
        time.sleep(0.5)
