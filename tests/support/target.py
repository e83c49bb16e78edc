"""examples/target_agent run as its own worker process, for the e2e tests and the target benchmark.

Its environment is its own: LiveKit's URL and keys, an OpenAI-compatible base URL (crosstalk's
scripted model, as no paid API is reachable here) and its ACME_* settings; nothing of crosstalk's
configuration, and it runs from a folder outside the repository (it imports nothing from crosstalk).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "target_agent" / "agent.py"


def scenario_dir(tmp: Path, scenario: dict[str, Any]) -> Path:
    """A ``CROSSTALK_SCENARIO_DIR`` under ``tmp`` holding ``scenario`` as ``<id>.json`` (UTF-8 as written)."""
    folder = tmp / "scenarios"
    folder.mkdir()
    (folder / f"{scenario['id']}.json").write_text(json.dumps(scenario, ensure_ascii=False), encoding="utf-8")
    return folder


class Target:
    """examples/target_agent as its own worker process (its own environment, nothing of crosstalk's)."""

    def __init__(self, stack: Any, tmp: Path, name: str, *, max_jobs: int = 20, log_name: str = "", **knobs: str) -> None:
        cfg = stack.config()
        self.name = name
        self.job_log = tmp / f"{log_name or name}.jsonl"
        self.out = tmp / f"{log_name or name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSTALK_", "LIVEKIT_", "OPENAI_"))}
        env |= {
            "LIVEKIT_URL": stack.livekit_url, "LIVEKIT_API_KEY": cfg.livekit_key,
            "LIVEKIT_API_SECRET": cfg.settings.livekit_api_secret,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{cfg.model_port}/v1", "OPENAI_API_KEY": "offline",
            "ACME_AGENT_NAME": name, "ACME_LLM_MODEL": "crosstalk-scripted", "ACME_EXECUTOR": "thread",
            "ACME_MAX_JOBS": str(max_jobs), "ACME_HEALTH_PORT": "0", "ACME_JOB_LOG": str(self.job_log), **knobs,
        }
        # run from a folder outside the repository: the example imports nothing from crosstalk
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLE), "start"], cwd=tmp, env=env,
                                     stdout=open(self.out, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + 90
        while b"registered worker" not in self.out.read_bytes():
            assert self.proc.poll() is None, self.out.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"{name} never registered:\n{self.out.read_text()[-3000:]}"
            time.sleep(0.2)

    def events(self, kind: str) -> list[dict[str, Any]]:
        if not self.job_log.exists():
            return []
        lines = self.job_log.read_text(encoding="utf-8").splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == kind]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
