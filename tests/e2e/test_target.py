"""crosstalk's customer against a user's own agent: examples/target_agent run as its own worker process.

Everything is real (nats-server, livekit-server, every crosstalk service under `just up`, the
example agent as a separate livekit-agents worker, registered under its own agent name); only
the target's LLM is crosstalk's scripted model, as no paid API is reachable here (the example
points its livekit-plugins-openai client at it through OPENAI_BASE_URL, as any user could).
What the target saw and said is read from the target's own log (ACME_JOB_LOG), never from
crosstalk's events.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from stack import running_stack
from support.target import Target, scenario_dir
from test_batch import read_audit, read_batch, read_turns, wait_finished

from services.judge.checks import ended_by
from shared import contracts, subjects
from shared.contracts import BatchReply
from shared.rooms import room_name

pytestmark = pytest.mark.e2e

USERDATA = {"account_id": "ACME-4417", "holder": "राज शर्मा", "plan": {"tier": "gold", "since": 2019}}
SCENARIO = {
    "id": "acme-locked-out",
    "title": "Locked out, account on file",
    "language": "en",
    "label": "locked-out caller with an account on file",
    "agent_expectations": "verifies the caller before unlocking",
    "tags": {"suite": "target-e2e"},
    "userdata": USERDATA,
    "roles": {
        "customer": {"name": "Raj", "persona": "You are Raj, a busy bank customer.", "goal": "Get back into your account."},
        "support": {"name": "Acme", "persona": "You are Acme support.", "goal": "Unlock the account safely."},
    },
    "script": [
        {"role": "customer", "text": "Hello, I am locked out of my account since this morning."},
        {"role": "support", "text": "I can help with that. Could you confirm your registered mobile number?"},
        {"role": "customer", "text": "It ends in 4417. मेरा नाम राज शर्मा है।"},
        {"role": "support", "text": "Thank you, you are verified. I have unlocked the account."},
        {"role": "customer", "text": "Great, I can log in again. Thanks!"},
        {"role": "support", "text": "Glad to help. Have a good day!", "end": True},
    ],
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("target")
    scenarios = scenario_dir(tmp, SCENARIO)
    with running_stack(tmp, CROSSTALK_MODEL_TTFT_MS="20", CROSSTALK_MODEL_TOKENS_PER_S="2000",
                       CROSSTALK_JOIN_DEADLINE_S="40", CROSSTALK_TARGET_JOIN_S="12", CROSSTALK_TARGET_REPLY_S="8",
                       CROSSTALK_SCENARIO_DIR=str(scenarios),
                       CROSSTALK_MODEL_SERVED_LOG=str(tmp / "served.jsonl")) as s:
        yield s


@pytest.fixture
def target(stack: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Target]:
    name, knobs = getattr(request, "param", ("acme-support", {}))
    t = Target(stack, tmp_path, name, **knobs)
    yield t
    t.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"----- {name} (last lines)", t.out.read_text(errors="replace")[-4000:], sep="\n")


async def start(stack: Any, body: dict[str, Any]) -> BatchReply:
    nc = await nats.connect(stack.nats_url)
    try:
        msg = await nc.request(subjects.BATCH_START, json.dumps(body).encode(), timeout=15)
        return contracts.decode(msg.data, BatchReply)
    finally:
        await nc.drain()


async def run_batch(stack: Any, body: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    reply = await start(stack, body)
    assert reply.accepted, reply
    nc = await nats.connect(stack.nats_url)
    try:
        await wait_finished(nc.jetstream(), body["batch_id"], timeout=timeout)
    finally:
        await nc.drain()
    return read_batch(stack, body["batch_id"])


async def test_a_batch_of_10_against_the_example_agent(stack: Any, target: Target) -> None:
    bid = f"tgt-{int(time.time())}"
    started = time.time()
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 10, "concurrency": 10,
                                    "scenario": "acme-locked-out", "max_turns": 8, "target_agent": "acme-support",
                                    "target_metadata": '{"tenant": "acme-eu"}'})
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 10, 0), batch
    assert batch["target_agent"] == "acme-support"
    jobs = {e["room"]: e for e in target.events("job")}
    replies: dict[str, list[str]] = {}
    for e in target.events("reply"):
        replies.setdefault(e["room"], []).append(e["text"])
    for cid, conv in batch["conversations"].items():
        room = room_name(cid, conv["attempts"])
        turns = read_turns(stack, bid, cid)
        assert [t["turn"] for t in turns] == list(range(len(turns))) and len(turns) >= 4, turns
        assert [t["role"] for t in turns] == ["customer", "support"] * (len(turns) // 2) + ["customer"] * (len(turns) % 2)
        # the target's words, exactly as the target itself says it published them, in order
        said = [t["text"] for t in turns if t["role"] == "support"]
        assert said == replies[room][:len(said)], (said, replies.get(room))
        assert any("मेरा नाम राज शर्मा है।" in t["text"] for t in turns)  # Devanagari byte-exact both ways
        for a, b in zip(turns, turns[1:], strict=False):
            assert started <= a["started_at"] <= a["ended_at"] <= b["ended_at"]
        # the scenario reached the target through simulation_context(), as the target logged it
        sim = jobs[room]["simulation"]
        assert sim["userdata"] == USERDATA and sim["run_id"] == bid and sim["label"] == SCENARIO["label"]
        assert sim["mode"] == 1 and sim["tags"] == SCENARIO["tags"]  # SIMULATION_MODE_TEXT
        assert jobs[room]["metadata"] == '{"tenant": "acme-eu"}'
        identity = {e["identity"] for e in target.events("reply") if e["room"] == room}
        assert conv["target_identity"] in identity, (conv["target_identity"], identity)
    # the room audit from livekit-server's webhooks: one customer, one support (the target's), no violation
    assert b"ignoring text input" not in target.out.read_bytes()  # every customer message reached the target
    audited = read_audit(stack, bid)
    for conv in audited["conversations"].values():
        assert conv["violations"] == [], conv["violations"]
        holders = {g["role"]: g["identity"] for g in conv["grants"]}
        assert holders["support"] == conv["target_identity"] and holders["customer"].startswith("sim-")
        kinds = {p["identity"]: p["kind"] for p in conv["participants"]}
        assert kinds[conv["target_identity"]] == "agent" and kinds[holders["customer"]] == "standard"


GREETING = "Welcome to Acme Bank! एक्मे बैंक में आपका स्वागत है।"


@pytest.mark.parametrize("target", [("acme-greets", {"ACME_GREETING": GREETING})], indirect=True, ids=["greets"])
async def test_a_greeting_the_target_says_first_is_turn_0_and_the_customer_answers_it(stack: Any, target: Target) -> None:
    """Everything the target says is a turn: its greeting is turn 0 (support, unprompted), heard out
    before the customer's first words (turn 1), never taken for the answer to them."""
    bid = f"tgt-greet-{int(time.time())}"
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 3, "concurrency": 3,
                                    "scenario": "acme-locked-out", "max_turns": 6, "target_agent": target.name})
    assert (batch["status"], batch["completed"]) == ("completed", 3), batch
    replies: dict[str, list[str]] = {}
    for e in target.events("reply"):
        replies.setdefault(e["room"], []).append(e["text"])
    script = [line["text"] for line in SCENARIO["script"]]
    for cid, conv in batch["conversations"].items():
        turns = read_turns(stack, bid, cid)
        assert [(t["turn"], t["role"], t["unprompted"]) for t in turns] == [
            (0, "support", True), (1, "customer", False), (2, "support", False), (3, "customer", False),
            (4, "support", False), (5, "customer", False)], turns
        assert [t["text"] for t in turns] == [GREETING, *script[:5]]  # Devanagari byte-exact
        assert turns[0]["first_token_s"] is turns[0]["total_s"] is None  # nobody asked: no response time
        said = [t["text"] for t in turns if t["role"] == "support"]
        assert said == replies[room_name(cid, conv["attempts"])][:3]  # as the target itself logged it
        assert conv["turns"] == 6 and conv["ended"] == "max_turns", conv


@pytest.mark.parametrize("target", [("acme-hangs-up", {"ACME_HANG_UP": "1"})], indirect=True, ids=["hangs-up"])
async def test_a_target_that_hangs_up_after_its_goodbye_ended_the_call(stack: Any, target: Target) -> None:
    """The agent's end_conversation tool: its goodbye plays out, then it leaves the room. It answered
    the last thing said, so the conversation completes as ended by support, its goodbye the last turn."""
    bid = f"tgt-hangup-{int(time.time())}"
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 2, "concurrency": 2,
                                    "scenario": "acme-locked-out", "max_turns": 10, "target_agent": target.name})
    assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", 2, 0), [
        (c["reason"], c["ended"]) for c in batch["conversations"].values()]
    for cid, conv in batch["conversations"].items():
        assert ended_by(conv["ended"]) == "support" and "left the room after answering" in conv["ended"], conv
        assert conv["attempts"] == 1 and conv["turns"] == 6, conv
        turns = read_turns(stack, bid, cid)
        assert [t["text"] for t in turns] == [line["text"] for line in SCENARIO["script"]]
        assert [t["role"] for t in turns] == ["customer", "support"] * 3
    assert len(target.events("hanging_up")) == 2


FAILURES = [
    ("acme-silent", {"ACME_NEVER_SPEAK": "1"}, "target_silent"),
    ("acme-stops", {"ACME_STOP_AFTER": "1"}, "target_unresponsive"),
    # leaves when spoken to after its first answer: the customer's second turn waits for a reply
    ("acme-leaves", {"ACME_LEAVE_AFTER": "1"}, "target_left: agent 'acme-leaves' (agent-"),
]


@pytest.mark.parametrize(("target", "reason"), [((n, k), r) for n, k, r in FAILURES], indirect=["target"],
                         ids=[r.split(":")[0] for _, _, r in FAILURES])
async def test_a_misbehaving_target_fails_with_its_named_reason_and_the_batch_goes_on(
        stack: Any, target: Target, reason: str) -> None:
    kind = reason.split(":")[0]
    bid = f"tgt-{kind.replace('_', '-')}-{int(time.time())}"
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 2, "concurrency": 2,
                                    "scenario": "acme-locked-out", "target_agent": target.name}, timeout=120)
    assert (batch["status"], batch["completed"], batch["failed"]) == ("failed", 0, 2), batch
    for conv in batch["conversations"].values():
        assert conv["reason"].startswith(reason), conv["reason"]
        assert conv["attempts"] == 1  # the target's failure is the result, not retried
    assert len({e["room"] for e in target.events("job")}) == 2, "the target got its jobs"
    # what the target itself logged: it heard the customer, and misbehaved as asked
    assert b"ignoring text input" not in target.out.read_bytes()
    replies = target.events("reply")
    expected = {"target_silent": 0, "target_unresponsive": 2, "target_left": 2}[kind]
    assert len(replies) == expected, replies
    if kind == "target_left":
        assert len(target.events("leaving")) == 2
        for conv in batch["conversations"].values():
            assert "left the room with a reply owed after 1 answer(s)" in conv["reason"], conv["reason"]
    if kind in ("target_unresponsive", "target_left"):  # the one answer is in each transcript, then nothing
        for cid in batch["conversations"]:
            assert [t["role"] for t in read_turns(stack, bid, cid)] == ["customer", "support", "customer"]


@pytest.mark.parametrize("target", [("acme-one-at-a-time", {"ACME_MAX_JOBS": "1"})], indirect=True, ids=["max1"])
async def test_a_target_that_reports_full_is_waited_for_never_overloaded(stack: Any, target: Target) -> None:
    """A target worker full at one call, a batch of 3 at concurrency 3: livekit-server places no job
    beyond the load the worker reports; those attempts are re-queued as no_capacity (the target served
    the batch: full, not absent), and every conversation completes, one call at a time."""
    bid = f"tgt-full-{int(time.time())}"
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 3, "concurrency": 3,
                                    "scenario": "acme-locked-out", "max_turns": 4, "target_agent": target.name},
                            timeout=300)
    assert (batch["status"], batch["completed"]) == ("completed", 3), batch
    assert sum(c["attempts"] for c in batch["conversations"].values()) > 3  # some waited for a free slot
    # the target's own record: never two calls at once
    spans = sorted((s["at"], e["at"]) for s, e in zip(
        sorted(target.events("job"), key=lambda e: e["job_id"]),
        sorted(target.events("ended"), key=lambda e: e["job_id"]), strict=True))
    assert len(spans) == 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


async def test_a_target_without_a_worker_is_a_no_show_named_within_the_deadline(stack: Any) -> None:
    bid = f"tgt-noshow-{int(time.time())}"
    started = time.monotonic()
    batch = await run_batch(stack, {"batch_id": bid, "conversations": 3, "concurrency": 3,
                                    "scenario": "acme-locked-out", "target_agent": "nobody-registered"}, timeout=120)
    assert (batch["status"], batch["failed"]) == ("failed", 3), batch
    for conv in batch["conversations"].values():
        assert conv["reason"].startswith("target_no_show: agent 'nobody-registered' did not join"), conv["reason"]
        assert "CROSSTALK_TARGET_JOIN_S" in conv["reason"]
    assert time.monotonic() - started < 60  # one deadline (12 s) and a margin, not a hang


async def test_bad_target_fields_are_rejected_naming_the_field(stack: Any) -> None:
    for body, field in [({"target_agent": "acme support"}, "target_agent"),
                        ({"target_agent": "acme", "target_metadata": "x" * 20000}, "target_metadata"),
                        ({"target_metadata": "{}"}, "target_metadata")]:
        reply = await start(stack, body)
        assert not reply.accepted and reply.field == field, (body, reply)
    await asyncio.sleep(0)
