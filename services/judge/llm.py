"""The LLM judge: each line of a scenario's ``agent_expectations`` judged by livekit-agents' evals.

``livekit.agents.evals`` (livekit-agents 1.8.9) runs a judge as one chat call that must answer
with the ``submit_verdict(verdict, reasoning)`` tool; its :class:`JudgeGroup` runs several at
once. Its public judges have fixed criteria (task completion, accuracy, ...), so each expectation
becomes one instruction-driven judge of the same kind, ``_LLMJudge`` (not exported by the
package; pinned with livekit-agents==1.8.9). Any OpenAI-compatible endpoint serves it
(``CROSSTALK_JUDGE_URL``); the scripted model stands in for one offline (services/model/judge.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import openai
from livekit.agents.evals import JudgeGroup
from livekit.agents.evals.judge import _LLMJudge
from livekit.agents.llm import ChatContext
from livekit.plugins import openai as lk_openai

from shared.scenarios import Scenario

from .checks import AGENT, Criterion, Turn

VERDICTS = {"pass": "pass", "fail": "fail", "maybe": "inconclusive"}


def expectations(text: str) -> list[str]:
    """One criterion per bullet (``-``, ``*``, ``1.``) of ``agent_expectations``; else the whole text."""
    bullets = [m.group(1).strip() for m in re.finditer(r"^\s*(?:[-*•]|\d+[.)])\s+(.+)$", text, re.M)]
    return bullets or ([text.strip()] if text.strip() else [])


def chat_context(turns: Sequence[Turn]) -> ChatContext:
    """The conversation as the judges read it: the agent under test is the assistant, the caller the user."""
    ctx = ChatContext()
    for t in turns:
        ctx.add_message(role="assistant" if t.role == AGENT else "user", content=t.text)
    return ctx


class LlmJudge:
    def __init__(self, base_url: str, api_key: str, model: str, *, timeout_s: float = 90.0) -> None:
        self.model = model
        self._client = openai.AsyncClient(base_url=base_url, api_key=api_key, max_retries=2, timeout=timeout_s)
        self._llm = lk_openai.LLM(model=model, client=self._client)

    async def aclose(self) -> None:
        await self._client.close()

    async def judge(self, scenario: Scenario, turns: Sequence[Turn]) -> list[Criterion]:
        criteria = expectations(scenario.agent_expectations)
        if not criteria:
            return []
        names = [f"expectation {i + 1}: {c}" for i, c in enumerate(criteria)]
        group = JudgeGroup(llm=self._llm, judges=[_LLMJudge(instructions=c, name=n) for c, n in zip(criteria, names, strict=True)])
        result = await group.evaluate(chat_context(turns))
        out = []
        for name in names:
            got = result.judgments.get(name)
            if got is None:  # JudgeGroup logs and drops a judge that raised (endpoint down, no verdict)
                out.append(Criterion(name=name, kind="llm", verdict="inconclusive",
                                     evidence=f"the judge model {self.model!r} gave no verdict"))
            else:
                out.append(Criterion(name=name, kind="llm", verdict=VERDICTS.get(got.verdict, "inconclusive"),  # type: ignore[arg-type]
                                     evidence=got.reasoning))
        return out
