"""The user's own agent (target_agent): validation, admission, the dispatch it gets, its replies, the offline model.

Pure parts only; tests/e2e/test_target.py runs the example agent against the whole stack.
"""

from __future__ import annotations

import json

import msgspec
import pytest
from google.protobuf import json_format
from livekit.protocol import agent_simulation as sim

from services.dispatcher import core, target
from services.dispatcher.state import BatchState, evolve
from services.dispatcher.validate import Rejection, validate
from services.model import unmarked
from services.model.core import ChatRequest, decode_request, plan_reply
from services.sink.core import batch_doc
from shared import config, contracts
from shared.capacity import Capacity
from shared.config import Settings
from shared.contracts import BatchAccepted, BatchSpec, ConversationEnded, JobMetadata, StartBatch
from shared.scenarios import library
from worker.simulator import customer as simulator
from worker.simulator import target_dispatch
from worker.simulator.target_link import ATTR_AGENT_NAME, TargetLink
from worker.simulator.target_reply import Reply, left_reason, overdue_reason

SETTINGS = Settings(max_conversations=1000, max_concurrency=200, join_deadline_s=10.0, conversation_timeout_s=100.0)
SCENARIOS = library()


def spec(n: int = 10, concurrency: int = 10, bid: str = "b1", target_agent: str | None = "acme-support") -> BatchSpec:
    return BatchSpec(batch_id=bid, conversations=n, concurrency=concurrency, scenario="en-account-help",
                     language="en", max_turns=8, mode="text", target_agent=target_agent)


def meta(**over: object) -> JobMetadata:
    base = dict(batch_id="b1", conversation_id="b1-00003", attempt=2, scenario="en-account-help", language="en",
                mode="text", max_turns=8, target_agent="acme-support", target_metadata='{"tenant": "eu"}')
    return JobMetadata(**{**base, **over})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- batch.start


def test_a_target_batch_is_accepted_with_its_fields() -> None:
    got = validate(StartBatch(target_agent="acme-support", target_metadata='{"k": "वि"}', conversations=3),
                   SETTINGS, SCENARIOS, received_at=1_795_000_000.0, seed="1:1")
    assert isinstance(got, BatchSpec)
    assert (got.target_agent, got.target_metadata) == ("acme-support", '{"k": "वि"}')


def test_crosstalks_own_name_is_not_a_target() -> None:
    got = validate(StartBatch(target_agent=SETTINGS.agent_name), SETTINGS, SCENARIOS, received_at=1.0, seed="1:1")
    assert isinstance(got, Rejection) and got.field == "target_agent" and "CROSSTALK_AGENT_NAME" in got.reason


def test_the_target_deadline_must_come_before_the_dispatchers() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load({"CROSSTALK_JOIN_DEADLINE_S": "30", "CROSSTALK_TARGET_JOIN_S": "30"})
    assert err.value.var == "CROSSTALK_TARGET_JOIN_S" and "CROSSTALK_JOIN_DEADLINE_S" in err.value.reason
    with pytest.raises(config.ConfigError) as err:
        config.load({"CROSSTALK_TARGET_REPLY_S": "0"})
    assert err.value.var == "CROSSTALK_TARGET_REPLY_S"
    ok = config.load({"CROSSTALK_TARGET_JOIN_S": "5", "CROSSTALK_TARGET_REPLY_S": "7"})
    assert (ok.target_join_s, ok.target_reply_s) == (5.0, 7.0)
    # unset, it stays below a short join deadline instead of refusing it
    assert config.load({"CROSSTALK_JOIN_DEADLINE_S": "15"}).target_join_s == 7.5
    assert config.load({}).target_join_s == 20.0


def test_the_cli_sends_the_target_fields_and_names_a_bad_one() -> None:
    from cli.app import start_body

    body = json.loads(start_body(target_agent="acme-support", target_metadata='{"t": 1}', conversations=2))
    assert body == {"target_agent": "acme-support", "target_metadata": '{"t": 1}', "conversations": 2}
    with pytest.raises(contracts.ContractError) as err:
        start_body(target_agent="acme support")
    assert err.value.field == "target_agent"


# --------------------------------------------------------------------------- admission and settling


def accepted(s: BatchSpec) -> BatchState:
    state = evolve(None, BatchAccepted(spec=s, at=0.0), 1)
    assert state is not None
    return state


def admit_all(states: list[BatchState], cap: Capacity) -> list[BatchState]:
    while (ev := core.plan_dispatch(states, 1000, 1.0, None, capacity=cap)) is not None:
        states = [evolve(s, ev, s.seq + 1) or s if s.spec.batch_id == ev.batch_id else s for s in states]
    return states


def test_a_target_conversation_holds_one_crosstalk_session_and_concurrency_bounds_the_target() -> None:
    # 6 free sessions: 6 target conversations (customers only), but 3 of crosstalk's own
    assert len(admit_all([accepted(spec())], Capacity(workers=1, capacity=6, free=6))[0].in_flight) == 6
    assert len(admit_all([accepted(spec(target_agent=None))], Capacity(workers=1, capacity=6, free=6))[0].in_flight) == 3
    # the batch's concurrency bounds the target's simultaneous jobs, whatever crosstalk could take
    assert len(admit_all([accepted(spec(concurrency=4))], Capacity(workers=4, capacity=64, free=64))[0].in_flight) == 4


def test_a_targets_failure_is_the_result_and_is_not_retried() -> None:
    state = admit_all([accepted(spec(n=1, concurrency=1))], Capacity(workers=1, capacity=4, free=4))[0]
    cid = next(iter(state.in_flight))
    for reason in ("target_silent: x", "target_no_show: y", "target_unresponsive: z", "target_left: w"):
        ended = ConversationEnded(batch_id="b1", conversation_id=cid, attempt=1, room="r", reason=reason, ok=False,
                                  turns=0, at=2.0)
        (settled,) = core.on_conversation_ended(state, ended, 2.0, SETTINGS)
        assert settled.outcome == "failed" and not settled.retry and settled.reason == reason


def test_a_no_show_of_a_target_that_served_the_batch_is_full_and_requeued() -> None:
    state = admit_all([accepted(spec(n=3, concurrency=2))], Capacity(workers=1, capacity=4, free=4))[0]
    first, second = sorted(state.in_flight)

    def no_show(cid: str) -> ConversationEnded:
        return ConversationEnded(batch_id="b1", conversation_id=cid, attempt=1, room="r", ok=False, turns=0, at=2.0,
                                 reason="target_no_show: agent 'acme-support' did not join within 20 s")

    # never seen in this batch: absent, a failure for good
    (absent,) = core.on_conversation_ended(state, no_show(first), 2.0, SETTINGS)
    assert absent.reason.startswith("target_no_show") and not absent.retry
    # the target joined another conversation of the batch: its workers exist and are full
    joined = evolve(state, core.ConversationJoined(batch_id="b1", conversation_id=second, attempt=1,
                                                   join_seconds=1.0, at=1.0), state.seq + 1)
    assert joined is not None
    (full,) = core.on_conversation_ended(joined, no_show(first), 2.0, SETTINGS)
    assert full.reason.startswith("no_capacity: agent 'acme-support' took no job") and full.retry
    assert "target_no_show" in full.reason  # what the customer saw stays in the reason
    requeued = evolve(joined, full, joined.seq + 1)
    assert requeued is not None and requeued.convs[first].requeues == 1  # no attempt used


def test_the_dispatcher_dispatches_only_the_customer_of_a_target_room() -> None:
    reqs = target.dispatches("room-1", meta(), "crosstalk")
    assert [(r.agent_name, r.room) for r in reqs] == [("crosstalk", "room-1")]
    assert contracts.decode(reqs[0].metadata.encode(), JobMetadata).target_agent == "acme-support"
    wanted = target.dispatches("r", meta(target_agent=None, target_metadata=None), "ct")
    assert len(wanted) == 2
    # after a create lost in transit, only what livekit-server does not list is created again
    assert target.missing(wanted, ["ct"]) == wanted[1:]
    assert target.missing(wanted, ["ct", "ct", "other"]) == []


# --------------------------------------------------------------------------- the target's dispatch


def test_the_target_dispatch_carries_the_simulation_as_livekit_agents_reads_it() -> None:
    sc = msgspec.structs.replace(SCENARIOS["en-account-help"], userdata={"account": "A-1", "name": "राज"},
                                 tags={"suite": "x"}, agent_expectations="verifies first")
    req = target_dispatch.request("room-1", meta(), sc)
    assert (req.agent_name, req.room, req.metadata) == ("acme-support", "room-1", '{"tenant": "eu"}')
    raw = req.attributes[target_dispatch.ATTR_SIMULATOR_DISPATCH]
    assert "राज" in raw  # UTF-8 as is, not escaped
    # parsed exactly as livekit-agents' JobContext.simulation_context does
    got = json_format.Parse(raw, sim.SimulationDispatch(), ignore_unknown_fields=True)
    assert (got.simulation_run_id, got.job_id, got.mode) == ("b1", "b1-00003-2", sim.SIMULATION_MODE_TEXT)
    assert json.loads(got.scenario.userdata) == {"account": "A-1", "name": "राज"}
    assert (got.scenario.label, got.scenario.agent_expectations, dict(got.scenario.tags)) == (
        sc.display_label, "verifies first", {"suite": "x"})
    assert sc.roles["customer"].goal in got.scenario.instructions


def test_a_voice_batch_dispatches_an_audio_simulation_which_keeps_the_targets_speech_models() -> None:
    """livekit-agents drops STT/TTS/VAD only when the simulation's mode is text (AgentSession._text_only)."""
    from livekit.agents.simulation import SimulationContext

    raw = target_dispatch.request("room-1", meta(mode="voice"), SCENARIOS["en-account-help"]).attributes[
        target_dispatch.ATTR_SIMULATOR_DISPATCH]
    got = json_format.Parse(raw, sim.SimulationDispatch(), ignore_unknown_fields=True)
    assert got.mode == sim.SIMULATION_MODE_AUDIO
    ctx = SimulationContext(got, job_ctx=None)  # type: ignore[arg-type]
    assert ctx.simulation_mode == sim.SIMULATION_MODE_AUDIO != sim.SIMULATION_MODE_TEXT


def test_the_target_lease_uses_its_livekit_job_id_or_a_stable_token() -> None:
    assert simulator.target_job_id("agent-AJ_abc123") == "AJ_abc123"
    odd = simulator.target_job_id("my agent.v2")
    assert contracts.is_token(odd) and odd == simulator.target_job_id("my agent.v2") and odd.startswith("target-")
    assert simulator.identity("AJ_x") == "sim-AJ_x"


# --------------------------------------------------------------------------- the target's replies


def test_a_reply_is_complete_once_read_and_the_agent_is_listening_again() -> None:
    r = Reply(sent_at=10.0, state="listening")
    assert not r.complete()
    r.opened(10.4)
    r.state = "speaking"
    r.closed("SG_1", "Hello, Raj.", 10.6)
    assert not r.complete()  # still speaking: another segment may follow (a tool call between two)
    r.opened(10.7)
    r.closed("SG_2", "नमस्ते!", 10.9)
    r.state = "listening"
    assert r.complete() and r.text == "Hello, Raj.\nनमस्ते!"
    assert (r.started_at, r.ended_at, r.first_token_s) == (10.4, 10.9, pytest.approx(0.4))
    # an agent that publishes no state: complete when its segments are read
    q = Reply(sent_at=1.0, state=None)
    q.opened(1.1)
    assert not q.complete()
    q.closed("SG_1", "ok", 1.2)
    assert q.complete()


def test_a_reply_read_in_full_is_what_an_agent_that_hangs_up_leaves() -> None:
    r = Reply(sent_at=1.0, state="listening")
    assert not r.read_in_full()
    r.opened(1.1)
    r.state = "speaking"
    assert not r.read_in_full()  # still being read
    r.closed("SG_1", "Goodbye!", 1.2)
    assert r.read_in_full() and not r.complete()  # its words are in; its state never came back
    blank = Reply(sent_at=1.0, state=None)
    blank.opened(1.1)
    blank.closed("SG_1", "  ", 1.2)
    assert not blank.read_in_full()  # an empty transcription is no answer


def test_a_target_that_leaves_after_answering_ended_the_call_else_it_left_the_caller_waiting() -> None:
    from services.judge.checks import ended_by

    reason, ok = left_reason(asked=False, answered=2, agent="acme", identity="agent-AJ_1")
    assert ok and ended_by(reason) == "support" and "left the room after answering" in reason
    for asked, answered, why in ((True, 2, "with a reply owed"), (False, 0, "before answering anything"),
                                 (True, 0, "with a reply owed")):
        reason, ok = left_reason(asked=asked, answered=answered, agent="acme", identity="agent-AJ_1")
        assert not ok and reason.startswith("target_left: agent 'acme' (agent-AJ_1) left the room " + why), reason
        assert ended_by(reason) is None


class Someone:
    """What TargetLink reads of a participant (livekit-rtc's RemoteParticipant: identity, kind, attributes)."""

    def __init__(self, identity: str, kind: int, **attributes: str) -> None:
        self.identity, self.kind, self.attributes = identity, kind, attributes


async def test_the_target_is_the_agent_carrying_its_agent_name_and_no_other() -> None:
    """livekit-agents 1.8.9 puts lk.agent.name on every job's participant (worker.py _on_accept)."""
    from livekit import rtc
    from livekit.agents.types import ATTRIBUTE_AGENT_NAME

    assert ATTRIBUTE_AGENT_NAME == ATTR_AGENT_NAME
    link = TargetLink(rtc.Room(), "acme-support")
    agent = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    assert link.is_target(Someone("agent-AJ_1", agent, **{ATTR_AGENT_NAME: "acme-support"}))  # type: ignore[arg-type]
    others = [Someone("agent-AJ_2", agent, **{ATTR_AGENT_NAME: "someone-else"}), Someone("agent-AJ_3", agent),
              Someone("sim-x", rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD, **{ATTR_AGENT_NAME: "acme-support"})]
    for p in others * 2:
        assert not link.is_target(p)  # type: ignore[arg-type]
    assert link._ignored == {"agent-AJ_2", "agent-AJ_3"}  # each logged once; a person is no agent at all


def test_a_late_reply_is_named_silent_or_unresponsive() -> None:
    assert overdue_reason(0, "acme", 8, "V").startswith("target_silent: agent 'acme'")
    assert overdue_reason(2, "acme", 8, "V").startswith("target_unresponsive: agent 'acme' answered 2 turn(s)")


# --------------------------------------------------------------------------- the offline model for a user's agent


def chat(*messages: tuple[str, str], tools: bool = False) -> ChatRequest:
    body = {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "end_conversation"}}]
    return decode_request(json.dumps(body).encode())


def test_a_prompt_without_the_marker_gets_the_next_support_line_of_the_script() -> None:
    script = SCENARIOS["hi-account-help"].script
    req = chat(("system", "You are Acme's agent."), ("user", script[0].text), ("assistant", "x"),
               ("user", "  " + script[2].text + "\n"))
    reply = plan_reply(req, SCENARIOS.get, lambda: SCENARIOS.values())
    assert (reply.text, reply.role) == (script[3].text, "support")  # Devanagari, byte-exact
    assert plan_reply(chat(("user", "what?")), SCENARIOS.get, lambda: SCENARIOS.values()).text == unmarked.UNMATCHED_REPLY
    # without scripts (a plain client of the old kind) the generic line stays
    assert plan_reply(chat(("user", script[0].text)), SCENARIOS.get).role == "none"


def test_the_last_support_line_ends_the_call_only_when_the_tool_is_offered() -> None:
    script = SCENARIOS["en-account-help"].script
    last_customer = script[-2].text
    assert unmarked.plan(chat(("user", last_customer)).messages, False, SCENARIOS.values())[:2] == (script[-1].text, False)
    req = chat(("user", last_customer), tools=True)
    assert plan_reply(req, SCENARIOS.get, lambda: SCENARIOS.values()).end_call is script[-1].end


# --------------------------------------------------------------------------- batch.json


def test_batch_json_records_the_target_agent_and_each_rooms_target_identity() -> None:
    doc = batch_doc.evolve(batch_doc.BatchDoc(batch_id="b1"), BatchAccepted(spec=spec(), at=1.0))
    assert doc.target_agent == "acme-support"
    ended = ConversationEnded(batch_id="b1", conversation_id="b1-00000", attempt=1, room="b1-00000-a1",
                              reason="max_turns", ok=True, turns=8, at=2.0, target_identity="agent-AJ_1")
    doc = batch_doc.evolve(doc, ended)
    assert doc.conversations["b1-00000"].target_identity == "agent-AJ_1"
    assert json.loads(batch_doc.encode_doc(doc))["conversations"]["b1-00000"]["target_identity"] == "agent-AJ_1"
