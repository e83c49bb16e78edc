"""The local model's pure core, the caller's prompt, and which model plays a scenario (no llama.cpp here)."""

from __future__ import annotations

import json
import time

import msgspec

from services.dispatcher.validate import Rejection, validate
from services.llm import core
from services.model.core import decode_request
from shared.caller_prompt import build, fill, named_facts
from shared.config import load, model_route
from shared.contracts import StartBatch
from shared.scenario_files import load_text
from shared.scenarios import END_TOOL, get

LIVEKIT_FILE = """
name: front-desk
scenarios:
  - label: Book a cleaning
    instructions: |
      You are Maria Lopez, email maria.lopez@example.com. You want a teeth cleaning
      next Tuesday at 10am. Your member_id is on file.
    agent_expectations: |
      - Confirms the appointment time.
    userdata: {member_id: M-2291, clinic: {city: Austin}}
"""


def request(messages: list[dict], **extra: object) -> bytes:
    return json.dumps({"model": "m", "messages": messages, **extra}).encode()


def test_prompt_drops_crosstalk_lines_and_cues_the_first_turn() -> None:
    sc = get("en-account-help")
    req = decode_request(request([{"role": "system", "content": sc.instructions("customer")}]))
    msgs = core.prompt_messages(req)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "[crosstalk" not in msgs[0]["content"] and msgs[1]["content"] == core.FIRST_TURN_CUE


def test_a_goodbye_ends_the_call_when_the_tool_is_offered() -> None:
    assert core.spoken_reply("Caller: Great, thanks. Goodbye!", True).end_call
    said = core.spoken_reply("Thanks! [end_conversation]", True)
    assert said.end_call and said.text == "Thanks!"
    assert not core.spoken_reply("Goodbye!", False).end_call
    assert not core.spoken_reply("My number ends in 4417.", True).end_call


def test_the_stream_holds_back_a_label_and_the_tool_name() -> None:
    stream = core.SpokenStream(offers_end=True)
    sent = "".join(stream.feed(p) for p in ["Customer: ", "Hi, I am ", "Raj and ", "I am ", "done. ", "end_conv",
                                            "ersation"])
    rest, reply = stream.finish()
    assert not sent.startswith("Customer") and "end_conv" not in sent + rest
    assert (sent + rest).strip() == reply.text == "Hi, I am Raj and I am done." and reply.end_call


def test_a_verdict_that_is_not_one_is_maybe() -> None:
    assert core.verdict_arguments('Reasoning: it said "unlocked".\nVerdict: pass') == {
        "verdict": "pass", "reasoning": 'it said "unlocked".'}
    assert core.verdict_arguments("{nope")["verdict"] == "maybe"
    req = decode_request(request([{"role": "system", "content": "judge"}, {"role": "user", "content": "x"}],
                                 tools=[{"type": "function", "function": {"name": "submit_verdict"}}]))
    assert core.plan(req, max_tokens=10, temperature=0.5).kind == "verdict"


def test_an_ended_call_gets_no_more_words() -> None:
    req = decode_request(request([
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "Bye!", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": END_TOOL, "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": ""}]))
    assert core.plan(req, max_tokens=10, temperature=0.5).kind == "silent"


def test_the_caller_prompt_uses_the_instructions_and_the_userdata_they_name() -> None:
    sc = load_text(LIVEKIT_FILE).scenarios[0]
    prompt = sc.instructions("customer")
    assert "Maria Lopez" in prompt and "next Tuesday at 10am" in prompt and END_TOOL in prompt
    assert "member id: M-2291" in prompt and "Austin" not in prompt  # only what the instructions name
    assert fill("Call from {clinic.city}, id {userdata.member_id}", sc.userdata) == "Call from Austin, id M-2291"
    assert named_facts("nothing", sc.userdata) == []
    assert build(sc.roles["customer"], "Ana", {}, "hi").endswith(f"call the {END_TOOL} tool.")


def test_model_route_per_scenario() -> None:
    auto = load({"CROSSTALK_LLM_URL": "http://127.0.0.1:8091/v1"})
    assert model_route(auto, has_script=True).kind == "scripted"
    assert model_route(auto, has_script=False).base_url == "http://127.0.0.1:8091/v1"
    assert model_route(load({}), has_script=False).kind == "scripted"  # no local model running: today's
    assert model_route(load({"CROSSTALK_MODEL": "local"}), has_script=True).kind == "local"
    assert model_route(load({"OPENAI_API_KEY": "k"}), has_script=False).kind == "openai"
    assert not load({"OPENAI_API_KEY": "k", "CROSSTALK_MODEL": "scripted"}).real_model


def test_scripted_batches_of_scriptless_scenarios_are_rejected_by_name() -> None:
    inline = msgspec.json.decode(json.dumps({"scenarios": [msgspec.to_builtins(load_text(LIVEKIT_FILE)
                                                                                 .scenarios[0].doc)]}),
                                 type=StartBatch)
    got = validate(inline, load({"CROSSTALK_MODEL": "scripted"}), {}, received_at=time.time(), seed="s")
    assert isinstance(got, Rejection) and got.field == "scenarios" and "book-a-cleaning" in got.reason
    assert not isinstance(validate(inline, load({}), {}, received_at=time.time(), seed="s"), Rejection)


def test_a_caller_opening_as_the_agent_is_held_and_rejected() -> None:
    guard = core.caller_guard("You are Maria Lopez, a patient.").pattern
    stream = core.SpokenStream(offers_end=True, guard=guard)
    sent = "".join(stream.feed(p) for p in ["Hi Maria Lopez, ", "how are ", "you today?"])
    stream.settle()
    assert sent == "" and stream.rejected
    ok = core.SpokenStream(offers_end=True, guard=guard)
    sent = "".join(ok.feed(p) for p in ["I want to move ", "my cleaning to ", "Thursday at 3pm, ", "please. ", "Thanks"])
    ok.settle()
    assert not ok.rejected and sent.startswith("I want to move")
