"""The scripted model's pure core: request validation, reply choice, tokens, OpenAI shapes."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.model import core
from shared.scenarios import END_TOOL, get, library

END_TOOLS = [{"type": "function", "function": {"name": END_TOOL, "parameters": {"type": "object"}}}]


def request(messages: list[dict], **extra: object) -> core.ChatRequest:
    return core.decode_request(json.dumps({"model": "m", "messages": messages, **extra}).encode())


def conversation(scenario_id: str, role: str, spoken: int, *, tools: bool = True) -> core.ChatRequest:
    """A request for ``role`` after it has spoken ``spoken`` lines (peer lines as user messages)."""
    sc = get(scenario_id)
    msgs: list[dict] = [{"role": "system", "content": sc.instructions(role)}]  # type: ignore[arg-type]
    for line in sc.script:
        if line.role == role:
            if spoken == 0:
                break
            spoken -= 1
            msgs.append({"role": "assistant", "content": line.text})
        else:
            msgs.append({"role": "user", "content": line.text})
    return request(msgs, tools=END_TOOLS) if tools else request(msgs)


def plan(req: core.ChatRequest) -> core.Reply:
    return core.plan_reply(req, library().get)


@pytest.mark.parametrize("scenario_id", sorted(library()))
@pytest.mark.parametrize("role", ["customer", "support"])
def test_each_turn_plays_the_roles_next_line(scenario_id: str, role: str) -> None:
    lines = get(scenario_id).lines_for(role)  # type: ignore[arg-type]
    for k, line in enumerate(lines):
        reply = plan(conversation(scenario_id, role, k))
        assert reply.text == line.text
        assert reply.end_call == line.end
        assert reply.finish_reason == ("tool_calls" if line.end else "stop")
        assert reply.role == role


def test_end_line_without_the_tool_offered_is_plain_text() -> None:
    lines = get("en-account-help").lines_for("support")
    reply = plan(conversation("en-account-help", "support", len(lines) - 1, tools=False))
    assert reply.text == lines[-1].text and lines[-1].end
    assert not reply.end_call and reply.finish_reason == "stop"


def test_tool_choice_none_suppresses_the_end_call() -> None:
    lines = get("en-account-help").lines_for("support")
    req = conversation("en-account-help", "support", len(lines) - 1)
    assert plan(req).end_call
    assert not plan(msgspec.structs.replace(req, tool_choice="none")).end_call


def test_exhausted_script_closes_in_the_marker_language_with_the_end_call() -> None:
    for scenario_id, lang, closing in (
        ("en-account-help", "en", core.CLOSING_LINES["en"]),
        ("hi-account-help", "hi", core.CLOSING_LINES["hi"]),
        ("hinglish-refund", "hi-Latn", core.CLOSING_LINES["hi-Latn"]),
    ):
        n = len(get(scenario_id).lines_for("customer"))
        reply = plan(conversation(scenario_id, "customer", n))
        assert reply.text == closing, lang
        assert reply.end_call and reply.finish_reason == "tool_calls"


def test_closing_line_falls_back_to_the_base_language_then_english() -> None:
    assert core.closing_line("hi-IN") == core.CLOSING_LINES["hi"]
    assert core.closing_line("fr") == core.CLOSING_LINES["en"]


def test_after_the_end_tool_result_the_reply_is_empty() -> None:
    sc = get("en-account-help")
    msgs = [
        {"role": "system", "content": sc.instructions("support")},
        {"role": "user", "content": "bye"},
        {
            "role": "assistant",
            "content": "Goodbye",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": END_TOOL, "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": ""},
    ]
    reply = plan(request(msgs, tools=END_TOOLS))
    assert reply == core.Reply("", False, "support")


def test_a_result_of_another_tool_does_not_end_the_script() -> None:
    sc = get("en-account-help")
    msgs = [
        {"role": "system", "content": sc.instructions("support")},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c9", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c9", "content": "42"},
    ]
    # a bare tool-call message is not a spoken turn: the first support line comes next
    assert plan(request(msgs, tools=END_TOOLS)).text == sc.lines_for("support")[0].text


def test_marker_in_a_developer_message_and_content_parts() -> None:
    sc = get("hi-account-help")
    msgs = [
        {"role": "developer", "content": [{"type": "text", "text": sc.instructions("customer")}]},
        {"role": "user", "content": [{"type": "text", "text": "start"}]},
    ]
    assert plan(request(msgs)).text == sc.lines_for("customer")[0].text


def test_no_marker_gives_a_generic_reply() -> None:
    reply = plan(request([{"role": "user", "content": "hello"}], tools=END_TOOLS))
    assert reply == core.Reply(core.GENERIC_REPLY, False, "none")


def test_a_marker_in_a_user_message_is_ignored() -> None:
    marker = get("en-account-help").instructions("customer")
    assert plan(request([{"role": "user", "content": marker}])).text == core.GENERIC_REPLY


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[crosstalk scenario=no-such role=customer lang=en]", "unknown scenario 'no-such'"),
        ("[crosstalk scenario=en-account-help role=boss lang=en]", "marker role 'boss'"),
    ],
)
def test_bad_marker_is_a_request_error_naming_the_message(content: str, reason: str) -> None:
    req = request([{"role": "user", "content": "x"}, {"role": "system", "content": content}])
    with pytest.raises(core.RequestError) as err:
        plan(req)
    assert err.value.param == "messages[1].content"
    assert reason in err.value.reason


@pytest.mark.parametrize(
    ("body", "param", "reason"),
    [
        (b"not json", None, "not valid JSON"),
        (b"[]", None, "Expected `object`"),
        (b'{"model": "m"}', "messages", "is required"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model", "is required"),
        (b'{"model": "m", "messages": []}', "messages", "at least one"),
        (b'{"model": "m", "messages": {}}', "messages", "Expected `array`"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role", "is required"),
        (b'{"model": "m", "messages": [{"role": "robot"}]}', "messages[0].role", "Invalid enum value"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content", "got `int`"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', "stream", "Expected `bool`"),
        (b'{"model": "m", "messages": [{"role": "user"}], "tools": [{"type": "function", "function": {}}]}',
         "tools[0].function.name", "is required"),
    ],
)
def test_bad_requests_name_the_field(body: bytes, param: str | None, reason: str) -> None:
    with pytest.raises(core.RequestError) as err:
        core.decode_request(body)
    assert err.value.param == param
    assert reason in err.value.reason
    out = err.value.body()["error"]
    assert out["type"] == "invalid_request_error" and out["param"] == param
    if param:
        assert out["message"].startswith(param)


def test_unknown_openai_fields_are_accepted() -> None:
    req = request([{"role": "user", "content": "x"}], temperature=0.2, n=1, parallel_tool_calls=False)
    assert req.messages[0].text() == "x"


@given(st.text())
def test_tokens_concatenate_back_exactly(text: str) -> None:
    tokens = core.tokenize(text)
    assert "".join(tokens) == text
    assert all(tokens)


def test_hindi_tokens_are_words_with_their_leading_space() -> None:
    text = get("hi-account-help").lines_for("support")[-1].text
    tokens = core.tokenize(text)
    assert tokens[0] == "ख़ुशी" and tokens[1] == " हुई"
    assert "".join(tokens).encode() == text.encode()


def test_chunks_have_the_openai_shape() -> None:
    mk = core.ChunkMaker("chatcmpl-1", 7, "m", include_usage=True)
    role = mk.role()
    assert role["object"] == "chat.completion.chunk" and role["usage"] is None
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    head, args = mk.tool_call("call_1", END_TOOL, "{}")
    assert head["choices"][0]["delta"]["tool_calls"][0] == {
        "index": 0, "id": "call_1", "type": "function", "function": {"name": END_TOOL, "arguments": ""}}
    assert args["choices"][0]["delta"]["tool_calls"][0] == {"index": 0, "function": {"arguments": "{}"}}
    assert mk.finish("tool_calls")["choices"][0]["finish_reason"] == "tool_calls"
    usage = mk.usage(3, 4)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
    assert "usage" not in core.ChunkMaker("c", 1, "m", include_usage=False).role()


def test_non_streamed_completion_carries_the_tool_call() -> None:
    reply = core.Reply("Bye now", True, "support")
    out = core.completion("chatcmpl-1", 1, "m", reply, "call_1", 5)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Bye now"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": END_TOOL, "arguments": "{}"}
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_a_script_written_after_the_marker_is_played_without_the_library() -> None:
    from msgspec.structs import replace

    inline = replace(get("hi-account-help"), id="not-in-any-library", embed_script=True)
    system = inline.instructions("support")
    req = request([{"role": "system", "content": system}, {"role": "user", "content": "नमस्ते"}])
    reply = core.plan_reply(req, lambda _: None)
    assert reply.text == inline.lines_for("support")[0].text and reply.role == "support"
    broken = system.replace('[{"text"', '[{"txt"')
    with pytest.raises(core.RequestError, match="bad \\[crosstalk script\\] line"):
        core.plan_reply(request([{"role": "system", "content": broken}]), lambda _: None)


def test_a_judge_request_gets_a_verdict_tool_call() -> None:
    tool = {"type": "function", "function": {"name": "submit_verdict", "parameters": {}}}
    req = request([{"role": "system", "content": "You are an evaluator"},
                   {"role": "user", "content": 'Criteria: says "hello"\n\nConversation:\nassistant: hello there'}],
                  tools=[tool], tool_choice="required")
    reply = core.plan_reply(req, lambda _: None)
    assert (reply.role, reply.end_call, reply.tool_name) == ("judge", True, "submit_verdict")
    assert json.loads(reply.tool_args)["verdict"] == "pass"
    body = core.completion("c1", 0, "m", reply, "call_1", 3)
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "submit_verdict"
