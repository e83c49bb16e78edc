"""Run the real stack (`just up` / `just down`) for tests, isolated from any other stack.

Every port is a free one and the run/data dirs are in a temp dir, so a test's
stack never collides with a developer's `just up` or with another test. Use::

    with running_stack(tmp_path) as stack:          # every program `just up` starts
        ... stack.nats_url, stack.livekit_url, stack.data_dir ...

``CROSSTALK_SERVICES`` (e.g. ``"nats,livekit"``) narrows what starts. Whatever
happens, the context manager leaves no process of the stack behind. What the stack is
(its ports, run dir, supervisord, tagged processes) comes from the stack package
itself (``infra.stack``), never a second reading of it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import nats
import psutil
import pytest
from support.harness import batch_events
from support.servers import _ephemeral_range, free_ports

from infra.stack import probes, supervisor
from infra.stack.config import PORTS, ROOT, Config
from shared.contracts import BatchEvent

__all__ = ["ROOT", "Stack", "free_ports", "running_stack", "stack_fixture"]

JUST = Path(sys.executable).parent / "just"

# Variables of the calling shell that would point the stack elsewhere.
_INHERITED_OUT = ("NATS_URL", "LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")

PORT_VARS = tuple(PORTS)  # every port the stack listens on, by its variable


UDP_PORTS = 1000
T = TypeVar("T")


class FromConfig(Generic[T]):
    """A :class:`Stack` attribute that is the stack's own config's (``Config.from_env``), never a copy."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, stack: Stack, owner: type | None = None) -> T:
        value: T = getattr(stack.config(), self.name)
        return value


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]

    @classmethod
    def create(cls, tmp: Path, **overrides: str) -> Stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSTALK_") and k not in _INHERITED_OUT}
        lo, hi = _ephemeral_range()
        # 1000 UDP ports: each peer connection takes one (measured: with 100, lk's load test stalled at
        # its 34th room every time; with 2000 it ran all 40; benchmarks/README.md, "UDP ports")
        udp = random.choice([p for p in range(15000, 64000, 1000) if p + UDP_PORTS - 1 < lo or p > hi])
        env["CROSSTALK_LIVEKIT_UDP_PORTS"] = f"{udp}-{udp + UDP_PORTS - 1}"
        ports = free_ports(len(PORT_VARS), avoid=set(range(udp, udp + UDP_PORTS)))
        env.update(zip(PORT_VARS, map(str, ports), strict=True))
        env["CROSSTALK_RUN_DIR"] = str(tmp / "run")
        env["CROSSTALK_DATA_DIR"] = str(tmp / "data")
        # one worker process (its metrics on the one port picked above), not one sized to the machine
        env["CROSSTALK_WORKERS"] = "1"
        env.update(overrides)
        return cls(tmp, env)

    def config(self) -> Config:
        """The stack's own reading of this environment (infra/stack/config.py)."""
        return Config.from_env(self.env)

    run_dir = FromConfig[Path]()
    data_dir = FromConfig[Path]()
    nats_url = FromConfig[str]()
    livekit_url = FromConfig[str]()

    @property
    def speech_url(self) -> str:
        """The stack's offline speech service (services/speech), an OpenAI base URL."""
        cfg = self.config()
        return f"http://{cfg.host}:{cfg.speech_port}/v1"

    async def batch_events(self, batch_id: str) -> list[BatchEvent]:
        """The batch's events as the BATCH_EVENTS stream holds them now."""
        nc = await nats.connect(self.nats_url)
        try:
            return await batch_events(nc.jetstream(), batch_id)
        finally:
            await nc.drain()

    def ports(self) -> list[int]:
        return [int(self.env[v]) for v in PORT_VARS]

    def just(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(JUST), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def up(self) -> subprocess.CompletedProcess[str]:
        res = self.just("up")
        if res.returncode != 0:
            raise AssertionError(f"just up failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def pids(self) -> dict[str, int]:
        """supervisord's pid and each program's, by name."""
        cfg = self.config()
        sup = supervisor.rpc(cfg).supervisor
        return {"supervisord": int(sup.getPID()), **{i["name"]: int(i["pid"]) for i in supervisor.process_infos(cfg)}}

    def processes(self) -> list[psutil.Process]:
        """Live processes that belong to this stack."""
        return probes.tagged_processes(self.config())

    def dump_logs(self, lines: int = 40) -> None:
        """Print the end of every program's log (pytest shows it with the failure)."""
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {log.name} (last {len(tail)} lines)", *tail, sep="\n")

    def cleanup(self) -> None:
        """`just down`, then kill anything of this stack that survived (a test must leave nothing running)."""
        if self.processes():
            self.just("down", timeout=180)
        left = self.processes()
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)


@contextmanager
def running_stack(tmp: Path, *, scripted_judge: bool = False, **overrides: str) -> Iterator[Stack]:
    """The stack up with ``overrides``; ``scripted_judge``: the judge service asks the stack's scripted
    model (services/model/judge.py's quoted-phrase rule stands in for a paid LLM judge)."""
    stack = Stack.create(tmp, **overrides)
    if scripted_judge:
        stack.env["CROSSTALK_JUDGE_URL"] = f"http://127.0.0.1:{stack.env['CROSSTALK_MODEL_PORT']}/v1"
        stack.env["CROSSTALK_JUDGE_MODEL"] = "crosstalk-scripted"
    try:
        stack.up()
        yield stack
    except BaseException:
        stack.dump_logs()
        raise
    finally:
        stack.cleanup()


def stack_fixture(name: str, *, scope: Literal["module", "function"] = "module", settle_s: float = 3.0,
                  **overrides: str) -> Any:
    """A ``stack`` fixture: :func:`running_stack` with ``overrides``, up ``settle_s`` before the first
    test (every worker registered with livekit-server), down after the last of ``scope``."""

    @pytest.fixture(scope=scope)
    def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
        """The whole stack (tests/e2e/stack.py ``stack_fixture``), with this module's settings."""
        with running_stack(tmp_path_factory.mktemp(name), **overrides) as s:
            time.sleep(settle_s)
            yield s

    return stack
