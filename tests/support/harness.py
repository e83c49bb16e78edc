"""Test helpers for running crosstalk processes for real: the dispatcher, the allocator, a fake agent worker.

Each process is a separate OS process (``python -m services.<name>``) configured
through the environment, with its log in a file that a failing test prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import contracts, streams, subjects
from shared.contracts import BatchEvent, BatchFinished

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
FAKE_AGENT = Path(__file__).with_name("fake_agent.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)  # fake agent: livekit_worker_id, worker_id

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Procs:
    """Every process a test started; all are stopped at the end (and their logs kept for failures)."""

    def __init__(self, workdir: Path, nats_url: str, livekit_env: dict[str, str]) -> None:
        self.workdir = workdir
        self.nats_url = nats_url
        self.livekit_env = livekit_env
        self.started: list[Proc] = []

    def base_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSTALK_", "LIVEKIT_", "FAKE_AGENT_"))}
        env.update(self.livekit_env)
        env.update({"NATS_URL": self.nats_url, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        env.update(extra)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], *, stdout_pipe: bool = False) -> Proc:
        log_path = self.workdir / f"{name}-{len(self.started)}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process
        popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE if stdout_pipe else log_file,
                                 stderr=log_file)
        proc = Proc(name, popen, log_path, env)
        self.started.append(proc)
        return proc

    def dispatcher(self, **env: str) -> Proc:
        full = self.base_env({"CROSSTALK_METRICS_PORT": str(free_port()), **env})
        return self._spawn("dispatcher", [PYTHON, "-m", "services.dispatcher"], full)

    def allocator(self, **env: str) -> Proc:
        full = self.base_env({"CROSSTALK_METRICS_PORT": str(free_port()), **env})
        return self._spawn("allocator", [PYTHON, "-m", "services.allocator"], full)

    def fake_agent(self, agent_name: str, *, mode: str = "complete", talk_s: float = 1.0,
                   ready_timeout: float = 60.0, max_jobs: int | None = None) -> Proc:
        full = self.base_env({"CROSSTALK_AGENT_NAME": agent_name, "FAKE_AGENT_MODE": mode,
                              "FAKE_AGENT_TALK_S": str(talk_s),
                              **({"CROSSTALK_WORKER_MAX_JOBS": str(max_jobs)} if max_jobs else {})})
        proc = self._spawn("fake-agent", [PYTHON, str(FAKE_AGENT)], full, stdout_pipe=True)
        ready = threading.Event()

        def watch_stdout() -> None:
            assert proc.popen.stdout is not None
            for line in proc.popen.stdout:
                if line.startswith(b"READY"):
                    parts = line.decode().split()
                    proc.info.update(zip(("livekit_worker_id", "worker_id"), parts[1:], strict=False))
                    ready.set()

        threading.Thread(target=watch_stdout, daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while not ready.wait(0.2):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake agent did not register:\n{proc.log()[-4000:]}")
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} ({p.log_path})\n{p.log()[-6000:]}" for p in self.started)


def has_allocator() -> bool:
    return (ROOT / "services" / "allocator" / "__main__.py").exists()


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


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
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


async def wait_finished(js: JetStreamContext, batch_id: str, timeout: float) -> BatchFinished:
    async def finished() -> BatchFinished | None:
        events = await batch_events(js, batch_id)
        done = [e for e in events if isinstance(e, BatchFinished)]
        return done[0] if done else None

    result: BatchFinished = await wait_for(finished, timeout, f"batch {batch_id} to finish", interval=0.5)
    return result
