"""Validate a decoded ``batch.start`` command: a fully defaulted :class:`BatchSpec`, or the field and why not.

The entrypoint decodes the body (``contracts.decode`` to :class:`StartBatch`);
a body that does not decode becomes a :class:`Rejection` through
:func:`undecodable`, so every refusal names a field and a reason.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from collections.abc import Mapping

import msgspec

from shared import batch_plan, voiceplan
from shared.config import Settings
from shared.contracts import BatchSpec, ContractError, StartBatch
from shared.scenarios import DEFAULT_SCENARIO, Scenario


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """A command that never becomes a batch: which field, and why."""

    field: str
    reason: str
    batch_id: str | None = None


def generated_batch_id(received_at: float, seed: str) -> str:
    """``b-20261125-165200-3fa2c1``: deterministic per stored command, so a redelivery maps to one batch."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(received_at))
    return f"b-{stamp}-{hashlib.sha256(seed.encode()).hexdigest()[:6]}"


def undecodable(exc: ContractError, claimed_batch_id: str | None) -> Rejection:
    """A body that is not a :class:`StartBatch`; ``claimed_batch_id`` only if it is a valid id."""
    reason = unknown_field_reason(exc.field) if "unknown field" in exc.reason else exc.reason
    return Rejection(field=exc.field, reason=reason, batch_id=claimed_batch_id)


def validate(
    cmd: StartBatch,
    settings: Settings,
    scenarios: Mapping[str, Scenario],
    *,
    received_at: float,
    seed: str,
) -> BatchSpec | Rejection:
    """Check a decoded command against this deployment's limits and scenarios, and fill in the defaults."""
    bid = cmd.batch_id

    def reject(field: str, reason: str) -> Rejection:
        return Rejection(field=field, reason=reason, batch_id=bid)

    if cmd.concurrency is not None and cmd.concurrency > settings.max_concurrency:
        return reject("concurrency", f"must be at most {settings.max_concurrency}, got {cmd.concurrency}")
    if cmd.scenarios is not None and cmd.scenario is not None:
        return reject("scenarios", "give either scenario (one library id) or scenarios (a file or a list), not both")
    chosen: list[Scenario] = []
    source = None
    if cmd.scenarios is not None:
        got = batch_plan.requested_scenarios(cmd.scenarios, settings.scenario_dir)
        if isinstance(got, batch_plan.Refusal):
            return reject(got.field, got.reason)
        chosen, source = got
    else:
        scenario_id = cmd.scenario or DEFAULT_SCENARIO
        found = scenarios.get(scenario_id)
        if found is None:
            known = ", ".join(sorted(scenarios))
            return reject("scenario", f"unknown scenario {scenario_id!r}; known: {known}")
        chosen = [found]
    scenario = chosen[0]
    if (unscripted := scriptless(chosen, settings, customer_only=cmd.target_agent is not None)) is not None:
        return reject("scenarios" if cmd.scenarios is not None else "scenario", unscripted)
    if cmd.target_agent is not None:
        problem = target_problem(cmd, settings)
        if problem is not None:
            return reject(*problem)
    elif cmd.target_metadata is not None:
        return reject("target_metadata", "is only used with target_agent (the agent it is handed to)")
    planned = cmd.scenarios is not None or cmd.trials is not None
    trials = cmd.trials or 1
    given = cmd.conversations if isinstance(cmd.conversations, int) else None
    conversations = given or (len(chosen) * trials if planned else 1)
    if planned and conversations != len(chosen) * trials:
        return reject("conversations", f"contradicts scenarios x trials = {len(chosen)} x {trials} = "
                                       f"{len(chosen) * trials}; leave it out or set it to that")
    if conversations > settings.max_conversations:
        field = "conversations" if given else ("trials" if cmd.trials else "scenarios")
        return reject(field, f"the batch would run {conversations} conversations; at most "
                             f"{settings.max_conversations} are allowed")
    languages = {sc.language for sc in chosen}
    language = cmd.language or (scenario.language if len(languages) == 1 else "mixed")
    for sc in chosen:
        if (cmd.language or sc.language) != sc.language and not settings.real_model:
            return reject("language", language_mismatch(sc, language, scenarios))
        if cmd.mode == "voice":
            # unknown voice, a language no TTS voice speaks, a scenario that disables voice: named
            # here, before any room exists (the worker would fail each conversation the same way)
            problem = voiceplan.check(sc, cmd.language or sc.language, settings,
                                      ("customer",) if cmd.target_agent is not None else ("customer", "support"))
            if problem is not None:
                return reject(*problem)
    carried = batch_plan.batch_scenarios(chosen) if planned else ()
    if (big := batch_plan.too_large(carried)) is not None:
        return reject(big.field, big.reason)
    requested_concurrency = cmd.concurrency or settings.max_concurrency
    return BatchSpec(
        batch_id=bid or generated_batch_id(received_at, seed),
        conversations=conversations,
        concurrency=min(requested_concurrency, conversations),
        scenario=scenario.id,
        language=language,
        max_turns=cmd.max_turns,
        mode=cmd.mode,
        scenarios=carried,
        trials=trials,
        source=source,
        target_agent=cmd.target_agent,
        target_metadata=cmd.target_metadata,
    )


def target_problem(cmd: StartBatch, settings: Settings) -> tuple[str, str] | None:
    """``(field, reason)`` when a ``target_agent`` batch cannot run here (the name itself was decoded as a token)."""
    if cmd.target_agent == settings.agent_name:
        return "target_agent", (f"{cmd.target_agent!r} is crosstalk's own agent name (CROSSTALK_AGENT_NAME); "
                                "name the agent your own worker registers")
    return None


def scriptless(chosen: list[Scenario], settings: Settings, *, customer_only: bool) -> str | None:
    """Why CROSSTALK_MODEL=scripted cannot play a chosen scenario (the first without a script for crosstalk's
    roles: the customer's against a target agent), or None."""
    if settings.model_choice != "scripted":
        return None
    for sc in chosen:
        if not (sc.lines_for("customer") if customer_only else sc.script):
            return (f"scenario {sc.id!r} ({sc.display_label}) has no crosstalk script, and CROSSTALK_MODEL=scripted "
                    "only plays scripts: give it a `crosstalk: script:`, or run it on the local model "
                    "(CROSSTALK_MODEL=local or auto)")
    return None


def unknown_field_reason(name: str) -> str:
    """Why an unknown ``batch.start`` field is refused, with the field the user probably meant."""
    known = StartBatch.__struct_fields__
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {name!r}; {hint}known fields: {', '.join(known)}"


def language_mismatch(scenario: Scenario, language: str, scenarios: Mapping[str, Scenario]) -> str:
    """The scripted model plays one script per scenario: never English while Hindi was asked."""
    variants = sorted(s.id for s in scenarios.values() if s.language == language)
    hint = (f"scenarios scripted in {language!r}: {', '.join(variants)}" if variants
            else f"no scenario has an offline script in {language!r}")
    return (f"scenario {scenario.id!r} is scripted in {scenario.language!r}, not {language!r}, and the offline "
            f"model plays the script as written; {hint} (with a real model, OPENAI_API_KEY/OPENAI_BASE_URL, "
            f"any language is served)")
