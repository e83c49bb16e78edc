"""The one AgentServer of this project (the worker's, the tests' fake agent's, the benchmarks' echo
agent's): one agent name, every job; the crosstalk worker's own wiring is in worker/main.py.

Jobs run on the thread executor by default (many sessions per process; see
benchmarks/ for the measured process-vs-thread comparison). ``load`` is the
share of ``CROSSTALK_WORKER_MAX_JOBS`` in use, scaled so a full worker reports
exactly livekit-server's ``agents.target_load`` (0.7) and stops getting jobs
instead of failing them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable

from livekit.agents import AgentServer, JobContext, JobExecutorType, JobRequest

log = logging.getLogger("worker")

TARGET_LOAD = 0.7  # livekit-server's agents.target_load default


def job_load(active: int, max_jobs: int) -> float:
    """Load reported to livekit-server: reaches TARGET_LOAD exactly when the worker is full."""
    return min(1.0, TARGET_LOAD * active / max_jobs)


def init_rtc() -> None:
    """Create livekit-rtc's FFI client once, in the main thread, before any job thread runs.

    ``FfiClient.instance`` is a lazily created, unlocked singleton: two job threads touching it
    first at the same moment each initialize the FFI, one room's ConnectCallback is delivered to
    the other client's queue, that job hangs in ``connect`` and the FFI then panics and SIGTERMs
    the whole worker (observed with livekit 1.1.21 under a dispatch burst).
    """
    from livekit.rtc._ffi_client import FfiClient

    FfiClient.instance  # noqa: B018


LOOP_MONITOR_ENV = "LIVEKIT_AGENTS_LOOP_BLOCK_WARN_MS"


def disable_loop_monitor() -> None:
    """Turn off livekit-agents' per-job event-loop monitor unless the operator asked for it.

    The monitor runs a thread per job that wakes every 20 ms and, whenever the job loop lags
    (which it does on a busy 2-core machine), samples stacks with ``sys._current_frames()``. On
    CPython 3.11 that call can start a garbage collection while holding the interpreter's
    thread-list lock; collecting a ``threading.local`` takes the same lock, so the thread
    deadlocks on itself while holding the GIL and the whole worker freezes for good (CPython
    gh-106883, fixed in 3.12; found here in the native stacks of every frozen worker in a
    200-at-100 batch: 19 of 19). Off, it also saves two wake-ups per 20 ms per job.
    Set ``LIVEKIT_AGENTS_LOOP_BLOCK_WARN_MS`` to turn it back on (safe on Python >= 3.12).
    """
    if os.environ.get(LOOP_MONITOR_ENV, "").strip() in ("", "0"):
        os.environ[LOOP_MONITOR_ENV] = "0"
    elif sys.version_info < (3, 12):
        log.warning("the livekit-agents loop monitor is on (%s); on Python < 3.12 it can deadlock a busy "
                    "worker (CPython gh-106883)", LOOP_MONITOR_ENV)


def agent_server(
    entrypoint: Callable[[JobContext], Awaitable[None]],
    *,
    agent_name: str,
    max_jobs: int,
    executor: JobExecutorType = JobExecutorType.THREAD,
    on_load: Callable[[int, float], None] | None = None,
    ws_url: str | None = None,
    api_key: str | None = None,
    api_secret: str | None = None,
    shutdown_process_timeout: float = 15.0,
) -> AgentServer:
    """The one ``AgentServer`` of this project: the worker's, the tests' fake agent's, the benchmarks' echo agent's.

    Accepts every job for ``agent_name`` and reports a load that reaches livekit-server's
    target exactly at ``max_jobs`` jobs (``on_load(active, load)`` sees each report). The
    LiveKit URL and keys default to ``LIVEKIT_URL`` / ``LIVEKIT_API_KEY`` / ``LIVEKIT_API_SECRET``.
    """
    init_rtc()
    disable_loop_monitor()

    def load(server: AgentServer) -> float:
        active = len(server.active_jobs)
        value = job_load(active, max_jobs)
        if on_load is not None:
            on_load(active, value)
        return value

    server = AgentServer(
        job_executor_type=executor,
        load_fnc=load,
        # a hair under TARGET_LOAD so this worker's own availability answer agrees with the server
        load_threshold=TARGET_LOAD - 1e-6,
        # livekit-agents estimates a not-yet-launched job's load as load_threshold / num_idle_processes:
        # with 0 idle runners the second of two simultaneous job requests was refused (measured) and
        # livekit-server dropped that dispatch; 8 warm runners accept a burst of 8 at once.
        num_idle_processes=min(max_jobs, 8),
        ws_url=ws_url,
        api_key=api_key,
        api_secret=api_secret,
        port=0,
        shutdown_process_timeout=shutdown_process_timeout,
    )
    server.rtc_session(entrypoint, agent_name=agent_name, on_request=accept)
    return server


async def serve(server: AgentServer, stop: asyncio.Event) -> bool:
    """Run ``server`` until it ends on its own (False; its error raised) or ``stop`` is set
    (True; it still runs, for the caller to drain and close)."""
    task = asyncio.create_task(server.run(devmode=False))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        return False
    return True


async def accept(req: JobRequest) -> None:
    await req.accept()
