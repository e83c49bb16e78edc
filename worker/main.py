"""The crosstalk worker: the project's ``AgentServer`` (worker/lifecycle/server.py) running one
:mod:`worker.job` per dispatch, its load and jobs on /metrics. ``python -m worker`` builds it.
"""

from __future__ import annotations

from livekit.agents import AgentServer, JobContext, JobExecutorType

from shared import config
from shared.config import Settings
from shared.metrics import WorkerMetrics
from worker import job
from worker.lifecycle.capacity import JobCounter
from worker.lifecycle.server import agent_server
from worker.voice import speech


def build(settings: Settings, metrics: WorkerMetrics) -> AgentServer:
    """The crosstalk worker: :func:`agent_server` running :mod:`worker.job`, its load on /metrics."""
    global _metrics, _jobs
    _metrics = metrics
    _jobs = JobCounter(metrics)

    # Silero VAD once per process, before any job (voice mode's sessions share it: worker/voice/speech.py)
    speech.process_vad(settings)

    def on_load(active: int, value: float) -> None:
        metrics.active_jobs.set(active)
        metrics.load.set(value)

    return agent_server(
        entrypoint, agent_name=settings.agent_name, max_jobs=settings.worker_max_jobs, on_load=on_load,
        executor=JobExecutorType.THREAD if settings.worker_executor == "thread" else JobExecutorType.PROCESS,
        ws_url=settings.livekit_url, api_key=settings.livekit_api_key, api_secret=settings.livekit_api_secret,
    )


# Module-level (picklable) so the process executor can run jobs too; each job process loads the
# settings from the same environment. Only the thread executor's jobs feed this process's /metrics.
_metrics: WorkerMetrics | None = None
_jobs = JobCounter()


async def entrypoint(ctx: JobContext) -> None:
    global _metrics
    if _metrics is None:  # a job process of the process executor
        from prometheus_client import CollectorRegistry

        _metrics = WorkerMetrics(CollectorRegistry())
    _jobs.enter()
    try:
        await job.run(ctx, config.load(), _metrics)
    finally:
        _jobs.exit()
