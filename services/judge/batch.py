"""Judge every conversation of a finished batch (the service and ``crosstalk judge`` both run this).

Idempotent: a conversation that already has a judgment file is left alone (``force`` redoes
it; ``retry`` redoes those whose judge model failed), so a judge restarted half-way continues,
and two runs write the same verdicts. When every conversation has its judgment, ``judged.json``
(the :class:`~shared.contracts.BatchJudged` event's body) says so: reports wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from shared import batch_plan, scenario_files
from shared.contracts import BatchJudged, BatchSpec
from shared.log import kv
from shared.scenarios import Scenario

from . import checks
from .core import Judgment, judgment
from .llm import LlmJudge, expectations
from .store import BatchFiles

log = logging.getLogger("judge")


@dataclass(frozen=True)
class JudgeConfig:
    """``CROSSTALK_JUDGE_URL`` (any OpenAI-compatible base URL; unset: ``OPENAI_BASE_URL``, else
    OpenAI's own when ``OPENAI_API_KEY`` is set, as the agents' model and speech follow them; none
    of these: no LLM judge, and every expectation is ``not_judged``), ``CROSSTALK_JUDGE_MODEL``,
    ``CROSSTALK_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``; never logged), ``CROSSTALK_JUDGE_WAIT_S``:
    how long a finished batch may wait for the sink's files."""

    url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str = field(default="none", repr=False)
    wait_s: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JudgeConfig:
        e = os.environ if env is None else env
        try:
            wait_s = float(e.get("CROSSTALK_JUDGE_WAIT_S") or 120.0)
        except ValueError:
            raise ValueError("CROSSTALK_JUDGE_WAIT_S: must be a number") from None
        url = ((e.get("CROSSTALK_JUDGE_URL") or "").strip() or (e.get("OPENAI_BASE_URL") or "").strip()
               or ("https://api.openai.com/v1" if e.get("OPENAI_API_KEY") else None))
        return cls(url=url,
                   model=(e.get("CROSSTALK_JUDGE_MODEL") or "").strip() or cls.model,
                   api_key=e.get("CROSSTALK_JUDGE_API_KEY") or e.get("OPENAI_API_KEY") or "none", wait_s=wait_s)

    def make_llm(self) -> LlmJudge | None:
        return LlmJudge(self.url, self.api_key, self.model) if self.url else None


def legacy_spec(batch_id: str, doc: Mapping[str, object]) -> BatchSpec:
    """The spec of a batch with no plan.json (accepted while no judge ran): one library scenario."""
    return BatchSpec(batch_id=batch_id, conversations=int(doc.get("requested") or 0),  # type: ignore[call-overload]
                     concurrency=1, scenario=str(doc.get("scenario") or ""), language=str(doc.get("language") or ""),
                     max_turns=int(doc.get("max_turns") or 8), mode="text")  # type: ignore[call-overload]


def scenario_of(spec: BatchSpec, index: int, library: Mapping[str, Scenario]) -> tuple[Scenario | None, int]:
    slot = batch_plan.slot(spec, index)
    if slot.doc is not None:
        return scenario_files.from_doc(slot.doc.doc), slot.trial
    return library.get(slot.scenario_id), slot.trial


def ready(files: BatchFiles) -> str | None:
    """None when the sink has written the finished batch and every completed transcript; else what is missing."""
    doc = files.batch_doc()
    if doc is None or doc.get("status") == "running":
        return "batch.json not finished yet"
    for cid, entry in (doc.get("conversations") or {}).items():
        if entry.get("outcome") == "completed" and len(files.turns(cid)) < int(entry.get("turns") or 0):
            return f"transcript of {cid} has fewer turns than batch.json says"
    return None


NO_JUDGE = ("no judge configured: set CROSSTALK_JUDGE_URL (or OPENAI_BASE_URL / OPENAI_API_KEY) "
            "to an OpenAI-compatible model")


def never_started(doc: Mapping[str, object], cid: str) -> bool:
    """A conversation of a cancelled batch that was never dispatched (batch.cancel): the sink's batch.json
    has no entry for it. Nothing ran, so nothing is judged: it is neither a failure nor in the counts."""
    entries = doc.get("conversations")
    return doc.get("status") == "cancelled" and not (isinstance(entries, dict) and cid in entries)


def _stale(j: Judgment | None, force: bool, retry: bool) -> bool:
    """Whether a conversation is (re)judged: no judgment yet, ``force``, or ``retry`` and its judge failed."""
    return j is None or force or (retry and j.judge_error is not None)


async def _expectations(scenario: Scenario, turns: list[checks.Turn], llm: LlmJudge | None,
                        ) -> tuple[list[checks.Criterion], str | None, str | None]:
    """The LLM judge's criteria (``not_judged`` without one), the model that judged, the judge's error."""
    if llm is None:
        return [checks.Criterion(name=f"expectation {i + 1}: {text}", kind="llm", verdict="not_judged", evidence=NO_JUDGE)
                for i, text in enumerate(expectations(scenario.agent_expectations))], None, None
    try:
        return await llm.judge(scenario, turns), llm.model, None
    except Exception as exc:  # crosstalk's fault, not the agent's: an infra failure, retried
        error = f"{type(exc).__name__}: {exc}"[:500]
        return [checks.Criterion(name="agent_expectations", kind="llm", verdict="inconclusive",
                                 evidence=f"judge failed: {error}")], llm.model, error


async def judge_batch(files: BatchFiles, library: Mapping[str, Scenario], llm: LlmJudge | None, *,
                      force: bool = False, retry: bool = False,
                      progress: Callable[[], Awaitable[object]] | None = None) -> list[Judgment]:
    """Write a judgment for every conversation of the batch that has none (all with ``force``; those
    whose judge failed with ``retry``); ``progress`` is awaited after each one (the service extends
    its message's ack deadline)."""
    doc = files.batch_doc() or {}
    spec = files.plan() or legacy_spec(files.batch_id, doc)
    entries = doc.get("conversations") or {}
    written: list[Judgment] = []
    for index in range(spec.conversations):
        cid = f"{spec.batch_id}-{index:05d}"
        if never_started(doc, cid) or not _stale(files.judgment(cid), force, retry):  # never started: cancelled
            continue
        scenario, trial = scenario_of(spec, index, library)
        turns = files.turns(cid)
        entry = entries.get(cid, {})
        criteria: list[checks.Criterion] = []
        model = error = None
        if scenario is not None and entry.get("outcome") == "completed":
            criteria = checks.run(scenario, turns, entry.get("ended"))
            if scenario.agent_expectations.strip():
                more, model, error = await _expectations(scenario, turns, llm)
                criteria += more
        elif scenario is None:
            error = f"scenario {batch_plan.slot(spec, index).scenario_id!r} is not in the library"
        j = judgment(batch_id=spec.batch_id, conversation_id=cid,
                     scenario_id=scenario.id if scenario else batch_plan.slot(spec, index).scenario_id,
                     label=scenario.display_label if scenario else "", trial=trial, entry=entry, turns=turns,
                     criteria=criteria, judge_model=model, judge_error=error, now=time.time())
        files.write_judgment(j)
        written.append(j)
        if progress is not None:
            await progress()
    log.info("batch judged", extra=kv(batch_id=spec.batch_id, judged=len(written),
                                      llm=llm.model if llm else None))
    return written


def judged_event(files: BatchFiles, now: float) -> BatchJudged | None:
    """The batch's :class:`BatchJudged` when every conversation has a judgment (else None)."""
    doc = files.batch_doc() or {}
    spec = files.plan() or legacy_spec(files.batch_id, doc)
    judgments = [files.judgment(cid) for cid in (f"{spec.batch_id}-{i:05d}" for i in range(spec.conversations))
                 if not never_started(doc, cid)]  # a cancelled batch: only what ran is judged
    if any(j is None for j in judgments):
        return None
    verdicts = {"pass": 0, "fail": 0, "inconclusive": 0, "infra_failure": 0}
    for j in judgments:
        assert j is not None
        verdicts[j.verdict or "infra_failure"] += 1
    return BatchJudged(batch_id=spec.batch_id, conversations=len(judgments), verdicts=verdicts,
                       not_judged=sum(1 for j in judgments if j is not None and j.not_judged),
                       judge_errors=sum(1 for j in judgments if j is not None and j.judge_error), at=now)


async def judge_to_the_end(files: BatchFiles, library: Mapping[str, Scenario], llm: LlmJudge | None, *,
                           force: bool = False, retry: bool = False, retry_after_s: float = 5.0,
                           progress: Callable[[], Awaitable[object]] | None = None,
                           ) -> tuple[list[Judgment], BatchJudged | None]:
    """Judge the batch; conversations whose judge model failed are judged once more after
    ``retry_after_s``; then ``judged.json`` is written. The judgments written, and the event."""
    written = {j.conversation_id: j for j in await judge_batch(files, library, llm, force=force, retry=retry,
                                                               progress=progress)}
    if llm is not None and any(j.judge_error for j in written.values()):
        await asyncio.sleep(retry_after_s)
        for j in await judge_batch(files, library, llm, retry=True, progress=progress):
            written[j.conversation_id] = j
    event = judged_event(files, time.time())
    if event is not None:
        files.write_judged(event)
    return list(written.values()), event
