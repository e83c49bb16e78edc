"""Run crosstalk processes for real in tests: services, the fake agent worker. One starter, one readiness check.

Each process is a separate OS process (``python -m services.<name>``, ``python -m support.fake_agent``)
configured through the environment, stdout and stderr in one log file that a failing test prints.
A process is ready when its ready line appears in that log (written since its last start); one
without a ready line is only started. A stopped or killed process can be started again, into the
same log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from shared import contracts, streams, subjects
from shared.contracts import BatchEvent, BatchFinished
from support.servers import ROOT, free_port, terminate

PYTHON = sys.executable
# what a process's ``python -m`` finds: the project, and tests/ for ``support`` (as pytest's pythonpath)
PYTHONPATH = os.pathsep.join((str(ROOT), str(ROOT / "tests")))
ALLOCATOR_READY = b'"msg": "ready"'  # services/allocator logs it once it serves its subjects
FAKE_AGENT_READY = b"READY "  # support/fake_agent.py prints it once livekit-server registered it
SPEECH_READY = b'"msg": "speech serving"'  # services/speech logs it once its models are loaded and it serves


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready_line: bytes | None = None
    popen: subprocess.Popen[bytes] | None = None
    info: dict[str, str] = field(default_factory=dict)  # fake agent: livekit_worker_id, worker_id
    _offset: int = 0

    def start(self, timeout: float = 60.0) -> Proc:
        """Start (again) and, if it has a ready line, wait for it."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if self.ready_line is not None:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> bytes:
        """The ready line of this run; RuntimeError with the log if it exits or takes longer than ``timeout``."""
        assert self.ready_line is not None
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            at = out.find(self.ready_line)
            if at >= 0 and out.find(b"\n", at) >= 0:
                return out[at:out.index(b"\n", at)]
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.returncode} before ready:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        terminate(self.popen, timeout)

    def kill(self) -> None:
        if self.popen is not None and self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def output(self) -> bytes:
        """What this run wrote so far (since its last start)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def metrics_port(self) -> int:
        return int(self.env["CROSSTALK_METRICS_PORT"])

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` with these labels on the process's /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


class Procs:
    """Every process a test started; all are stopped at the end (and their logs kept for failures)."""

    def __init__(self, workdir: Path, nats_url: str, livekit_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.nats_url = nats_url
        self.livekit_env = livekit_env or {}
        self.started: list[Proc] = []

    def base_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSTALK_", "LIVEKIT_", "FAKE_AGENT_"))}
        env.update(self.livekit_env)
        env.update({"NATS_URL": self.nats_url, "PYTHONPATH": PYTHONPATH, "PYTHONUNBUFFERED": "1"})
        env.update(extra)
        return env

    def start(self, name: str, module: str, env: dict[str, str], *, ready_line: bytes | None = None,
              timeout: float = 60.0) -> Proc:
        """``python -m module`` with the base environment plus ``env`` (and a free metrics port)."""
        full = self.base_env({"CROSSTALK_METRICS_PORT": str(free_port()), **env})
        proc = Proc(name, [PYTHON, "-m", module], full, self.workdir / f"{name}-{len(self.started)}.log", ready_line)
        self.started.append(proc)
        return proc.start(timeout)

    def dispatcher(self, **env: str) -> Proc:
        return self.start("dispatcher", "services.dispatcher", env)

    def allocator(self, **env: str) -> Proc:
        return self.start("allocator", "services.allocator", env, ready_line=ALLOCATOR_READY)

    def sink(self, **env: str) -> Proc:
        return self.start("sink", "services.sink", env)

    def speech(self, timeout: float = 180.0, **env: str) -> Proc:
        """services/speech on a free port; ``proc.info["url"]`` is its OpenAI base URL (ends in /v1)."""
        port = env.pop("CROSSTALK_SPEECH_PORT", None) or str(free_port())
        proc = self.start("speech", "services.speech", {"CROSSTALK_SPEECH_PORT": port, **env},
                          ready_line=SPEECH_READY, timeout=timeout)
        proc.info["url"] = f"http://127.0.0.1:{port}/v1"
        return proc

    def fake_agent(self, agent_name: str, *, mode: str = "complete", talk_s: float = 1.0,
                   ready_timeout: float = 60.0, max_jobs: int | None = None) -> Proc:
        env = {"CROSSTALK_AGENT_NAME": agent_name, "FAKE_AGENT_MODE": mode, "FAKE_AGENT_TALK_S": str(talk_s),
               **({"CROSSTALK_WORKER_MAX_JOBS": str(max_jobs)} if max_jobs else {})}
        proc = self.start("fake-agent", "support.fake_agent", env, ready_line=FAKE_AGENT_READY,
                          timeout=ready_timeout)
        ready = proc.wait_ready(0).decode().split()
        proc.info.update(zip(("livekit_worker_id", "worker_id"), ready[1:], strict=False))
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} ({p.log_path})\n{p.log()[-6000:]}" for p in self.started)



async def read_subject(js: JetStreamContext, stream: str, subject: str) -> list[Any]:
    """Raw messages on ``subject`` (wildcards allowed) in stream order."""
    cfg = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, filter_subject=subject,
                         inactive_threshold=30.0, mem_storage=True)
    sub = await js.pull_subscribe(subject, durable=None, stream=stream, config=cfg)
    out: list[Any] = []
    try:
        remaining = (await sub.consumer_info()).num_pending
        while remaining > 0:
            try:
                msgs = await asyncio.wait_for(sub.fetch(min(remaining, 500), timeout=1), 5)
            except Exception:
                continue
            for m in msgs:
                remaining = m.metadata.num_pending
                out.append(m)
    finally:
        await sub.unsubscribe()
    return out


async def batch_events(js: JetStreamContext, batch_id: str) -> list[BatchEvent]:
    msgs = await read_subject(js, streams.BATCH_EVENTS.name, subjects.batch_events(batch_id))
    return [contracts.decode_event(m.data, BatchEvent) for m in msgs]


async def all_batch_events(js: JetStreamContext) -> list[BatchEvent]:
    msgs = await read_subject(js, streams.BATCH_EVENTS.name, subjects.BATCH_EVENTS_ALL)
    return [contracts.decode_event(m.data, BatchEvent) for m in msgs]


@contextlib.asynccontextmanager
async def phantom_capacity(nc: Any, agent_name: str, capacity: int = 16,
                           worker_id: str = "w-phantom") -> AsyncIterator[None]:
    """Announce worker capacity for ``agent_name`` with no worker behind it (as shared/capacity.py
    heartbeats): the dispatcher admits conversations that livekit-server then places nowhere."""
    from shared import capacity as cap

    async def beat() -> None:
        while True:
            hb = cap.heartbeat(worker_id=worker_id, agent_name=agent_name, capacity=capacity, rooms=(),
                               at=time.time())
            await nc.publish(subjects.worker_capacity(worker_id), contracts.encode(hb))
            await asyncio.sleep(cap.HEARTBEAT_S)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.25
) -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def dispatcher_started(js: JetStreamContext, timeout: float = 30.0) -> None:
    """Wait until the dispatcher has added its conversation consumer, which it does once it serves."""
    conv = streams.dispatcher_conv()

    async def added() -> bool:
        try:
            await js.consumer_info(conv.stream, conv.name)
            return True
        except Exception:
            return False

    await wait_for(added, timeout, "dispatcher to start")


def agent_name() -> str:
    """A fresh agent name, so a test's dispatches reach only the workers it started."""
    return f"agent-{uuid.uuid4().hex[:8]}"


async def wait_finished(js: JetStreamContext, batch_id: str, timeout: float) -> BatchFinished:
    async def finished() -> BatchFinished | None:
        events = await batch_events(js, batch_id)
        done = [e for e in events if isinstance(e, BatchFinished)]
        return done[0] if done else None

    result: BatchFinished = await wait_for(finished, timeout, f"batch {batch_id} to finish", interval=0.5)
    return result
