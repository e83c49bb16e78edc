"""`crosstalk test` from a CI job: examples/ci/crosstalk-test.sh against examples/target_agent.

Everything real (nats-server, livekit-server, every crosstalk service, the example agent as its
own worker started by `crosstalk test --agent-cmd`); the agent's LLM and the judge model are the
scripted model (no paid API here): the agent answers from the scenario's script, the judge by
its documented quoted-phrase rule (services/model/judge.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack import Stack, running_stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "ci" / "crosstalk-test.sh"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ci")
    scen_dir = tmp / "scenarios"
    scen_dir.mkdir()
    # the scripted model answers an agent with no marker from the library's scripts: it must know this file's
    shutil.copy(SCRIPT.with_name("scenarios.yaml"), scen_dir / "ci.yaml")
    with running_stack(tmp, scripted_judge=True, CROSSTALK_MODEL_TTFT_MS="20", CROSSTALK_MODEL_TOKENS_PER_S="2000",
                       CROSSTALK_JOIN_DEADLINE_S="40", CROSSTALK_TARGET_JOIN_S="15", CROSSTALK_TARGET_REPLY_S="8",
                       CROSSTALK_SCENARIO_DIR=str(scen_dir)) as s:
        yield s


def stack_env(stack: Stack) -> dict[str, str]:
    """What a CI job sets to reach this stack: its NATS and LiveKit, and where its data lives."""
    cfg = stack.config()
    return {**os.environ, **stack.env, "NATS_URL": stack.nats_url, "LIVEKIT_URL": stack.livekit_url,
            "LIVEKIT_API_KEY": cfg.livekit_key, "LIVEKIT_API_SECRET": cfg.settings.livekit_api_secret}


def run_ci(stack: Stack, tmp: Path, agent: str, **more: str) -> subprocess.CompletedProcess[str]:
    env = {**stack_env(stack), "AGENT_NAME": agent, "OUT_DIR": str(tmp / agent), "TRIALS": "2",
           # the example agent's own settings: the scripted model as its LLM, a job per thread
           "OPENAI_BASE_URL": f"http://127.0.0.1:{stack.env['CROSSTALK_MODEL_PORT']}/v1", "OPENAI_API_KEY": "offline",
           "ACME_AGENT_NAME": agent, "ACME_LLM_MODEL": "crosstalk-scripted", "ACME_EXECUTOR": "thread",
           "ACME_HEALTH_PORT": "0", "ACME_MAX_JOBS": "20", **more}
    return subprocess.run([str(SCRIPT), "--json"], env=env, capture_output=True, text=True, timeout=400, cwd=tmp)


def verdict(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert res.stdout.strip(), res.stderr[-3000:]
    return json.loads(res.stdout)


def test_an_answering_agent_passes_and_a_silent_stopping_or_leaving_one_fails(stack: Stack, tmp_path: Path) -> None:
    ok = run_ci(stack, tmp_path, "acme-ci-ok")
    got = verdict(ok)
    assert ok.returncode == 0, (got["violations"], ok.stderr[-3000:])
    assert got["passed"] and got["totals"]["passed"] == got["totals"]["conversations"] == 2
    row = got["scenarios"][0]
    assert (row["scenario_id"], row["n"], row["pass_rate"], row["pass_k"]) == ("ci-locked-out", 2, 1.0, 1.0)
    suites = ET.parse(tmp_path / "acme-ci-ok" / "junit.xml").getroot()
    assert [(s.get("tests"), s.get("failures"), s.get("errors")) for s in suites] == [("2", "0", "0")]
    agent_log = Path(got["report"]["json"]).with_name("agent.log")
    assert b"registered worker" in agent_log.read_bytes()  # the user's agent ran, its log kept beside the results

    for agent, knob, label in (("acme-ci-silent", {"ACME_NEVER_SPEAK": "1"}, "target_silent"),
                               ("acme-ci-stops", {"ACME_STOP_AFTER": "1"}, "target_unresponsive"),
                               ("acme-ci-leaves", {"ACME_LEAVE_AFTER": "1"}, "target_left")):
        bad = run_ci(stack, tmp_path, agent, **knob)
        got = verdict(bad)
        assert bad.returncode == 1, (agent, bad.stderr[-3000:])
        totals = got["totals"]
        assert (totals["pass_rate"], totals["failed"], totals["infra_failures"]) == (0.0, 2, 0), (agent, totals)
        assert got["scenarios"][0]["failing_criteria"] == {label: 2}, (agent, got["scenarios"])
        junit = (tmp_path / agent / "junit.xml").read_text(encoding="utf-8")
        assert junit.count("<failure") == 2 and label in junit and "<skipped" not in junit
        # and gated against the answering run as a baseline: a regression too
        gate = subprocess.run([str(ROOT / ".venv" / "bin" / "crosstalk"), "compare", ok_report(ok),
                               got["report"]["json"]], env=stack_env(stack), capture_output=True, text=True, timeout=60)
        assert gate.returncode == 1 and "pass_rate 1.000 -> 0.000" in gate.stderr, (agent, gate.stderr)


def ok_report(res: subprocess.CompletedProcess[str]) -> str:
    return str(verdict(res)["report"]["json"])


def test_a_stack_that_is_down_exits_3_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    res = subprocess.run([str(SCRIPT)], env={**os.environ, "NATS_URL": f"nats://127.0.0.1:{dead}",
                                             "OUT_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach NATS" in lines[0], res.stderr
