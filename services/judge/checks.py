"""Deterministic checks of one conversation (no model, no network): a pure function of its transcript.

Each check of a scenario's ``crosstalk.checks`` (shared.scenarios.Checks) becomes one
:class:`Criterion` with its verdict and the evidence it rests on (the turn it found or
missed). The agent under test is the ``support`` role.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from shared.scenarios import END_TOOL, Checks, Scenario
from shared.stats import percentile

Verdict = Literal["pass", "fail", "inconclusive"]  # a conversation's
# a criterion's: ``not_judged`` when nothing could decide it (no judge configured) -- never a pass
CriterionVerdict = Literal["pass", "fail", "inconclusive", "not_judged"]
AGENT = "support"


class Criterion(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: Literal["check", "llm", "outcome"]  # outcome: how the agent ended the call (judge/core.py)
    verdict: CriterionVerdict
    evidence: str


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """What a check reads of a transcript line (services/sink TurnLine; extra fields ignored)."""

    turn: int
    role: str
    text: str
    first_token_s: float | None = None
    total_s: float | None = None
    tool_calls: list[dict[str, Any]] | None = None  # not recorded by this worker yet; read when present
    timings: dict[str, float] = {}  # every other numeric field of the line (voice timings), by name
    unprompted: bool = False  # the agent under test spoke with no caller turn waiting (a greeting, a follow-up)

    def timing(self, name: str) -> float | None:
        value = getattr(self, name, None) if name in ("first_token_s", "total_s") else self.timings.get(name)
        return value if isinstance(value, int | float) else None


class ToolCall(msgspec.Struct, frozen=True):
    name: str
    by: str | None
    arguments: dict[str, Any]


def ended_by(ended: str | None) -> str | None:
    """``"end_conversation: support"`` -> ``support``; None when the end tool did not end it."""
    m = re.match(rf"{END_TOOL}:\s*(customer|support)\b", ended or "")
    return m.group(1) if m else None


def tool_calls(turns: Sequence[Turn], ended: str | None) -> list[ToolCall]:
    """Tool calls the record shows: the end tool (from how the call ended) and any a turn line carries."""
    calls = [ToolCall(str(c.get("name")), t.role, dict(c.get("arguments") or {}))
             for t in turns for c in t.tool_calls or () if isinstance(c, dict)]
    who = ended_by(ended)
    if who is not None:
        calls.append(ToolCall(END_TOOL, who, {}))
    return calls


# --------------------------------------------------------------------------- language by script

_DEVANAGARI = re.compile(r"[\u0900-\u097F]")
_LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")
DEVANAGARI_LANGS = {"hi", "mr", "ne", "sa"}


def script_share(text: str) -> tuple[float, float]:
    """Shares of Devanagari and Latin letters among the text's letters of either script."""
    dev, lat = len(_DEVANAGARI.findall(text)), len(_LATIN.findall(text))
    total = dev + lat
    return (dev / total, lat / total) if total else (0.0, 0.0)


def language_fits(text: str, language: str) -> bool | None:
    """Whether ``text`` is written in ``language``'s script (None: a language this check does not know).

    A script check only: it tells Hindi (Devanagari) from English or Hinglish (``hi-Latn``), not
    English from Hinglish.
    """
    base, _, script = language.partition("-")
    dev, lat = script_share(text)
    if base in DEVANAGARI_LANGS and script.lower() != "latn":
        return dev >= 0.5
    if script.lower() == "latn" or base in {"en", "fr", "de", "es", "it", "pt", "nl"}:
        return lat >= 0.9
    return None


# --------------------------------------------------------------------------- the checks


def _quote(t: Turn) -> str:
    text = t.text if len(t.text) <= 160 else t.text[:157] + "..."
    return f"turn {t.turn} ({t.role}): {text}"


def run(scenario: Scenario, turns: Sequence[Turn], ended: str | None) -> list[Criterion]:
    c: Checks = scenario.checks
    out: list[Criterion] = []
    agent = [t for t in turns if t.role == AGENT]

    def add(name: str, verdict: Verdict, evidence: str) -> None:
        out.append(Criterion(name=name, kind="check", verdict=verdict, evidence=evidence))

    for phrase in c.must_mention:
        hit = next((t for t in agent if phrase.casefold() in t.text.casefold()), None)
        add(f"must_mention: {phrase}", "pass" if hit else "fail",
            _quote(hit) if hit else f"no {AGENT} turn contains {phrase!r}")
    for phrase in c.must_not_say:
        hit = next((t for t in agent if phrase.casefold() in t.text.casefold()), None)
        add(f"must_not_say: {phrase}", "fail" if hit else "pass",
            _quote(hit) if hit else f"no {AGENT} turn contains {phrase!r}")
    calls = tool_calls(turns, ended)
    for want in c.tool_called:
        match = next((k for k in calls if k.name == want.name and (want.by is None or k.by == want.by)
                      and all(k.arguments.get(a) == v for a, v in (want.arguments or {}).items())), None)
        label = f"tool_called: {want.name}" + (f" by {want.by}" if want.by else "")
        seen = ", ".join(f"{k.name}({k.arguments}) by {k.by}" for k in calls) or "none"
        add(label, "pass" if match else "fail", f"tool calls seen: {seen}")
    if c.ended_by is not None:
        who = ended_by(ended)
        ok = who is not None and (c.ended_by == "either" or who == c.ended_by)
        add(f"ended_by: {c.ended_by}", "pass" if ok else "fail", f"the conversation ended with {ended or 'no end'!r}")
    if c.within_turns is not None:  # the exchange's length: a greeting or follow-up nobody asked for is not a turn of it
        asked = [t for t in turns if not t.unprompted]
        add(f"within_turns: {c.within_turns}", "pass" if len(asked) <= c.within_turns else "fail",
            f"{len(asked)} turn(s)" + (f" (+{len(turns) - len(asked)} unprompted)" if len(asked) < len(turns) else ""))
    if c.language:
        lang = scenario.language if c.language is True else str(c.language)
        out.append(_language(lang, turns))
    if c.latency is not None:
        out.extend(_latency(c, agent))
    return out


def _language(lang: str, turns: Sequence[Turn]) -> Criterion:
    name = f"language: {lang}"
    results = [(t, language_fits(t.text, lang)) for t in turns]
    if any(fit is None for _, fit in results):
        return Criterion(name=name, kind="check", verdict="inconclusive",
                         evidence=f"no script rule for language {lang!r}")
    wrong = [t for t, fit in results if not fit]
    if wrong:
        return Criterion(name=name, kind="check", verdict="fail",
                         evidence=f"{len(wrong)} turn(s) not in {lang}'s script; first: {_quote(wrong[0])}")
    return Criterion(name=name, kind="check", verdict="pass" if turns else "inconclusive",
                     evidence=f"all {len(turns)} turn(s) in {lang}'s script (script check only)")


def _latency(c: Checks, agent: Sequence[Turn]) -> list[Criterion]:
    assert c.latency is not None
    lim = c.latency
    limits: list[tuple[str, str, float]] = [  # (field, statistic, limit)
        (f, stat, v) for f, stat, v in (("first_token_s", "max", lim.first_token_s_max),
                                        ("first_token_s", "p95", lim.first_token_s_p95),
                                        ("total_s", "max", lim.total_s_max)) if v is not None]
    limits += [(f, "max", v) for f, v in lim.max.items()] + [(f, "p95", v) for f, v in lim.p95.items()]
    out = []
    for fname, stat, limit in limits:
        name = f"latency: {fname} {stat} <= {limit}"
        values = [v for t in agent if (v := t.timing(fname)) is not None]
        got = max(values, default=None) if stat == "max" else percentile(values, 95)
        if got is None:
            out.append(Criterion(name=name, kind="check", verdict="inconclusive",
                                 evidence=f"no {AGENT} turn recorded {fname}"))
            continue
        out.append(Criterion(name=name, kind="check", verdict="pass" if got <= limit else "fail",
                             evidence=f"{got:.3f} s over {len(values)} {AGENT} turn(s)"))
    return out
