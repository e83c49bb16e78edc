"""The scripted model over real HTTP, spoken to by the clients the worker uses.

The server runs in-process (``serve_in_background``) on a free port; the clients are
the real ``livekit-plugins-openai`` LLM and the ``openai`` SDK, plus raw aiohttp
where a client would refuse to send a malformed body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai as openai_sdk
import pytest
from livekit.agents import llm
from livekit.plugins import openai as lk_openai
from support.servers import free_port

from services.model.core import CLOSING_LINES
from services.model.main import serve_in_background
from services.model.unmarked import UNMATCHED_REPLY
from shared.contracts import ROLES, Role
from shared.scenarios import END_TOOL, get

ROOT = Path(__file__).resolve().parents[2]
MODEL = "crosstalk-scripted"
KEY = "crosstalk-offline"
END_TOOLS = [{"type": "function", "function": {"name": END_TOOL, "parameters": {"type": "object", "properties": {}}}}]


@llm.function_tool
async def end_conversation() -> None:
    """End the conversation once it has reached its natural end."""


@pytest.fixture(scope="module")
async def base_url() -> AsyncIterator[str]:
    async with serve_in_background(ttft_ms=0, tokens_per_s=2000) as url:
        yield url


class Said:
    def __init__(self) -> None:
        self.text = ""
        self.calls: list[llm.FunctionToolCall] = []
        self.first_token_s: float | None = None
        self.total_s = 0.0


async def ask(model: llm.LLM, ctx: llm.ChatContext, tools: list[llm.Tool] | None = None) -> Said:
    said = Said()
    t0 = time.monotonic()
    async with model.chat(chat_ctx=ctx, tools=tools or []) as stream:
        async for chunk in stream:
            if chunk.delta is None:
                continue
            if chunk.delta.content and said.first_token_s is None:
                said.first_token_s = time.monotonic() - t0
            said.text += chunk.delta.content or ""
            said.calls += chunk.delta.tool_calls
    said.total_s = time.monotonic() - t0
    return said


def peer_of(role: Role) -> Role:
    return "support" if role == "customer" else "customer"


@pytest.mark.parametrize("scenario_id", ["en-account-help", "hi-account-help", "hinglish-refund"])
async def test_livekit_llm_plays_a_whole_conversation(base_url: str, scenario_id: str) -> None:
    """Two chat contexts talk through the livekit plugin exactly as two agents would."""
    sc = get(scenario_id)
    model = lk_openai.LLM(model=MODEL, base_url=base_url, api_key=KEY)
    ctxs = {role: llm.ChatContext.empty() for role in ROLES}
    for role in ROLES:
        ctxs[role].add_message(role="system", content=sc.instructions(role))
    transcript: list[tuple[str, str]] = []
    speaker: Role = "customer"
    try:
        for _ in range(2 * len(sc.script)):
            said = await ask(model, ctxs[speaker], [end_conversation])
            transcript.append((speaker, said.text))
            msg = ctxs[speaker].add_message(role="assistant", content=said.text)
            ctxs[peer_of(speaker)].add_message(role="user", content=said.text)
            if said.calls:
                assert [(c.name, c.arguments) for c in said.calls] == [(END_TOOL, "{}")]
                call = said.calls[0]
                # as AgentSession records it: the call grouped with its message, then its output
                ctxs[speaker].items.append(
                    llm.FunctionCall(id=f"{msg.id}/fnc_0", call_id=call.call_id, name=call.name, arguments="{}"))
                ctxs[speaker].items.append(
                    llm.FunctionCallOutput(call_id=call.call_id, name=call.name, output="", is_error=False))
                after = await ask(model, ctxs[speaker], [end_conversation])
                assert after.text == "" and after.calls == []
                break
            speaker = peer_of(speaker)
    finally:
        await model.aclose()
    assert transcript == [(line.role, line.text) for line in sc.script]
    # UTF-8 byte-exact, Devanagari included
    assert [t.encode() for _, t in transcript] == [line.text.encode() for line in sc.script]


async def test_livekit_llm_exhausted_script_closes_with_the_end_call(base_url: str) -> None:
    sc = get("hi-account-help")
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content=sc.instructions("customer"))
    for line in sc.script:
        ctx.add_message(role="assistant" if line.role == "customer" else "user", content=line.text)
    model = lk_openai.LLM(model=MODEL, base_url=base_url, api_key=KEY)
    try:
        said = await ask(model, ctx, [end_conversation])
        no_tool = await ask(model, ctx)
    finally:
        await model.aclose()
    assert said.text == CLOSING_LINES["hi"]
    assert [c.name for c in said.calls] == [END_TOOL]
    assert no_tool.text == CLOSING_LINES["hi"] and no_tool.calls == []


async def test_livekit_llm_without_a_marker_is_answered_from_the_scripts(base_url: str) -> None:
    """A user's own agent (target_agent) has its own prompt: it gets the support line that follows
    the script line it was just told, or a fixed line when its last user message is in no script."""
    script = get("hi-account-help").script
    model = lk_openai.LLM(model=MODEL, base_url=base_url, api_key=KEY)
    try:
        for user, expected in (("Hi there", UNMATCHED_REPLY), (script[0].text, script[1].text)):
            ctx = llm.ChatContext.empty()
            ctx.add_message(role="system", content="You are a helpful assistant.")
            ctx.add_message(role="user", content=user)
            said = await ask(model, ctx, [end_conversation])
            assert said.text == expected and said.calls == []
    finally:
        await model.aclose()


async def test_time_to_first_token_and_rate_are_respected() -> None:
    ttft_ms, rate = 300.0, 40.0
    sc = get("en-account-help")
    line = sc.lines_for("customer")[0].text
    words = len(line.split())
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content=sc.instructions("customer"))
    async with serve_in_background(ttft_ms=ttft_ms, tokens_per_s=rate) as url:
        model = lk_openai.LLM(model=MODEL, base_url=url, api_key=KEY)
        try:
            said = await ask(model, ctx)
        finally:
            await model.aclose()
    assert said.text == line
    assert said.first_token_s is not None
    assert said.first_token_s >= ttft_ms / 1000 * 0.8
    assert said.total_s >= (ttft_ms / 1000 + (words - 1) / rate) * 0.8


async def test_openai_sdk_stream_with_usage_and_tool_call(base_url: str) -> None:
    sc = get("en-account-help")
    end_line = sc.lines_for("support")[-1]
    messages = [{"role": "system", "content": sc.instructions("support")}]
    for line in sc.script[:-1]:
        messages.append({"role": "assistant" if line.role == "support" else "user", "content": line.text})
    async with openai_sdk.AsyncOpenAI(base_url=base_url, api_key=KEY) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=END_TOOLS, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == end_line.text
    assert len([c for c in with_choices if c.choices[0].delta.content]) == len(end_line.text.split())
    calls = [tc for c in with_choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].id and calls[0].type == "function" and calls[0].function.name == END_TOOL
    assert "".join(tc.function.arguments or "" for tc in calls) == "{}"
    assert with_choices[-1].choices[0].finish_reason == "tool_calls"
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_openai_sdk_non_streamed_completion(base_url: str) -> None:
    sc = get("hi-account-help")
    first = sc.lines_for("customer")[0].text
    async with openai_sdk.AsyncOpenAI(base_url=base_url, api_key=KEY) as client:
        out = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": sc.instructions("customer")}])
        models = await client.models.list()
    assert out.object == "chat.completion"
    assert out.choices[0].message.content == first
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls
    assert [m.id for m in models.data] == [MODEL]


async def test_openai_sdk_bad_request_names_the_field(base_url: str) -> None:
    async with openai_sdk.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as client:
        with pytest.raises(openai_sdk.BadRequestError) as err:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": 5}])  # type: ignore[list-item]
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict)
    error = body.get("error", body)
    assert error["param"] == "messages[0].content"
    assert "messages[0].content" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": 1}', "stream"),
        (b'{"model": "m", "messages": [{"role": "system", "content": "[crosstalk scenario=nope role=support lang=en]"}]}',
         "messages[0].content"),
    ],
)
async def test_raw_bad_bodies_get_400_and_the_server_keeps_serving(
    base_url: str, body: bytes, param: str | None
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/chat/completions", data=body,
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["param"] == param
        assert error["type"] == "invalid_request_error" and error["message"]
        async with http.get(f"{base_url.removesuffix('/v1')}/healthz") as resp:
            assert resp.status == 200 and (await resp.json()) == {"status": "ok"}


async def test_hindi_bytes_on_the_wire_are_raw_utf8(base_url: str) -> None:
    sc = get("hi-account-help")
    line = sc.lines_for("customer")[0].text
    body = {"model": MODEL, "stream": True,
            "messages": [{"role": "system", "content": sc.instructions("customer")}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    for word in line.split():
        assert word.encode("utf-8") in raw


async def test_hundreds_of_concurrent_streams_each_get_their_own_line() -> None:
    rng = random.Random(7)
    cases = []
    for _ in range(300):
        sc = get(rng.choice(["en-account-help", "hi-account-help"]))
        role: Role = rng.choice(ROLES)
        lines = sc.lines_for(role)
        k = rng.randrange(len(lines))
        messages = [{"role": "system", "content": sc.instructions(role)}]
        messages += [{"role": "assistant", "content": f"turn {i}"} for i in range(k)]
        cases.append((messages, lines[k].text))

    async with serve_in_background(ttft_ms=100, tokens_per_s=100) as url:
        async with openai_sdk.AsyncOpenAI(base_url=url, api_key=KEY) as client:

            async def one(messages: list[dict]) -> str:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=messages, tools=END_TOOLS, stream=True)  # type: ignore[arg-type]
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            got = await asyncio.gather(*(one(m) for m, _ in cases))
    assert got == [want for _, want in cases]


async def wait_healthy(url: str, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"model exited with {proc.returncode} before serving")
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} not healthy in {timeout}s")


async def test_python_dash_m_serves_metrics_and_stops_on_sigterm() -> None:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "CROSSTALK_MODEL_PORT": str(port), "CROSSTALK_METRICS_PORT": str(metrics_port),
           "CROSSTALK_MODEL_TTFT_MS": "0"}
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.model", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        sc = get("en-account-help")
        async with openai_sdk.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY) as client:
            out = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": sc.instructions("customer")}])
        assert out.choices[0].message.content == sc.lines_for("customer")[0].text
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                metrics = await resp.text()
        assert 'crosstalk_model_requests_total{role="customer"} 1.0' in metrics
        assert "crosstalk_model_request_seconds_count 1.0" in metrics
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    assert proc.returncode == 0, err.decode()
    assert b"scripted model serving" in err and b"scripted model stopped" in err


def test_python_dash_m_rejects_bad_config_naming_the_variable() -> None:
    env = {**os.environ, "CROSSTALK_MODEL_PORT": "eighty"}
    proc = subprocess.run([sys.executable, "-m", "services.model"], cwd=ROOT, env=env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"CROSSTALK_MODEL_PORT" in proc.stderr and b"must be an integer" in proc.stderr


async def test_a_client_leaving_mid_stream_does_not_hurt_the_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="model")
    sc = get("en-account-help")
    body = {"model": MODEL, "stream": True,
            "messages": [{"role": "system", "content": sc.instructions("customer")}]}
    async with serve_in_background(ttft_ms=0, tokens_per_s=20) as url:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{url}/chat/completions", json=body)
            assert (await resp.content.readline()).startswith(b"data: ")
            resp.close()  # drop the connection with most of the line unsent
        await asyncio.sleep(0.3)  # the server notices on its next write
        async with openai_sdk.AsyncOpenAI(base_url=url, api_key=KEY) as client:
            out = await client.chat.completions.create(model=MODEL, messages=body["messages"])  # type: ignore[arg-type]
    assert out.choices[0].message.content == sc.lines_for("customer")[0].text
    assert any(r.getMessage() == "client went away mid-stream" for r in caplog.records)


async def test_every_completion_served_in_full_is_logged_with_its_conversation(tmp_path: Path) -> None:
    """The served log is the ground truth the benchmarks compare transcripts with (Hindi byte-exact)."""
    log_path = tmp_path / "served.jsonl"
    sc = get("hi-account-help")
    async with serve_in_background(ttft_ms=0, tokens_per_s=5000, served_log=log_path) as url:
        async with openai_sdk.AsyncOpenAI(base_url=url, api_key=KEY,
                                          default_headers={"X-Crosstalk-Conversation": "b1/b1-00000/2"}) as client:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": sc.instructions("customer")}])
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": sc.instructions("customer")}], stream=True)
            async for _ in stream:
                pass
    lines = [json.loads(line) for line in log_path.read_bytes().splitlines()]
    first = sc.lines_for("customer")[0].text
    assert [(x["conversation"], x["role"], x["text"]) for x in lines] == [("b1/b1-00000/2", "customer", first)] * 2
    assert first.encode() in log_path.read_bytes()  # raw UTF-8, not \u escapes
