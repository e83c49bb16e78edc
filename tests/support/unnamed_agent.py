"""A test-only LiveKit agent worker registered without an agent name (automatic dispatch), as LiveKit's
quickstart agents are: livekit-server offers it a job for every room that gets its default dispatch.

It prints ``READY <livekit worker id>`` once registered and ``JOB <room>`` for every job request
livekit-server sends it, then turns the job down (no job process is started: the request is the
evidence that the room was open to automatic dispatch). Run: ``python -m support.unnamed_agent``
with LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET set (``harness.Procs.start`` does).
"""

from __future__ import annotations

import asyncio
import signal

from livekit.agents import AgentServer, JobContext, JobExecutorType, JobRequest

from worker.lifecycle.server import serve


async def entrypoint(ctx: JobContext) -> None:  # never runs: every request is rejected
    ctx.shutdown("unnamed agent takes no job")


async def on_request(req: JobRequest) -> None:
    print(f"JOB {req.room.name}", flush=True)
    await req.reject()


async def main() -> None:
    server = AgentServer(job_executor_type=JobExecutorType.THREAD, num_idle_processes=0, load_fnc=lambda: 0.0,
                         port=0)
    server.rtc_session(entrypoint, agent_name="", on_request=on_request)  # "": automatic dispatch
    server.on("worker_registered", lambda worker_id, _info: print(f"READY {worker_id}", flush=True))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if await serve(server, stop):  # until stopped (or the server ends on its own)
        await server.aclose()


if __name__ == "__main__":
    asyncio.run(main())
