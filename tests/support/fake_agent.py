"""A test-only LiveKit agent worker that joins, reports and leaves: no model, no talking.

It registers with livekit-server under ``CROSSTALK_AGENT_NAME`` exactly like the
real worker, so the dispatcher under test cannot tell the difference. Per job it
reads the :class:`JobMetadata`, asks ``role.request`` (when no allocator answers it
fails closed: it leaves without a role, as the real worker does), connects, publishes
``AgentJoined`` and then, by ``FAKE_AGENT_MODE``:

- ``complete`` (default): waits ``FAKE_AGENT_TALK_S``; the support agent publishes
  ``ConversationEnded(ok=True, reason="end_conversation: support")``; both leave.
- ``leave``: disconnects right after joining without any end event (an agent that died).
- ``stall``: accepts the job and never joins (placed by livekit-server, never joined).

Like the real worker it announces its capacity on NATS (``worker/lifecycle/capacity.py``, the same code):
``CROSSTALK_WORKER_MAX_JOBS`` sessions (default 16), and its load says full at that many. Each
job start logs ``jobs running=<n> peak=<m>`` (counted by the entrypoints, not sampled).

Its ``AgentServer`` is the worker's own (``worker.lifecycle.server.agent_server``). Run:
``python -m support.fake_agent`` with ``PYTHONPATH=<repo>:<repo>/tests`` (``harness.Procs.fake_agent``
does), NATS_URL and LIVEKIT_* set. It prints ``READY <livekit worker id> <worker id>`` once
livekit-server has registered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

import nats
from livekit.agents import AutoSubscribe, JobContext

from shared import bus, config, contracts, subjects
from shared.contracts import (
    AgentJoined,
    ConversationEnded,
    JobMetadata,
    Role,
    RoleRelease,
    RoleReply,
    RoleRequest,
)
from worker.lifecycle.capacity import Announcer, JobCounter
from worker.lifecycle.lease import request_role
from worker.lifecycle.server import agent_server

log = logging.getLogger("fake_agent")

# NATS_URL, CROSSTALK_AGENT_NAME, CROSSTALK_WORKER_MAX_JOBS: read as the real worker reads them
SETTINGS = config.load()
MODE = os.environ.get("FAKE_AGENT_MODE", "complete")
TALK_S = float(os.environ.get("FAKE_AGENT_TALK_S", "1.0"))
ROLE_WAIT_S = 10.0  # as long as the real worker keeps asking while an allocator restarts


async def ask_role(nc: nats.NATS, ctx: JobContext) -> RoleReply | None:
    """The allocator's grant, or None: fails closed when no allocator answers (never guesses a role)."""
    req = RoleRequest(room=ctx.job.room.name, job_id=ctx.job.id, identity=ctx.local_participant_identity)
    try:
        reply = await request_role(nc, req, within_s=ROLE_WAIT_S)  # asked as the real worker asks
    except bus.NO_ANSWER:
        log.warning("no allocator answered within %ss: leaving without a role", ROLE_WAIT_S)
        return None
    return reply if reply.granted and reply.role is not None else None


async def entrypoint(ctx: JobContext) -> None:
    running = JOBS.enter()
    log.info("jobs running=%d peak=%d room=%s", running, JOBS.peak, ctx.job.room.name)
    try:
        await _entrypoint(ctx)
    finally:
        JOBS.exit()


async def _entrypoint(ctx: JobContext) -> None:
    meta = contracts.decode(ctx.job.metadata.encode(), JobMetadata)
    room = ctx.job.room.name
    nc = await nats.connect(SETTINGS.nats_url)
    js = nc.jetstream(timeout=10)
    role: Role | None = None
    try:
        if MODE == "stall":
            await asyncio.sleep(3600)
            return
        grant = await ask_role(nc, ctx)
        if grant is None or grant.role is None:
            ctx.shutdown("role denied")
            return
        role = grant.role
        await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)
        await js.publish(
            subjects.conv_event(meta.batch_id, meta.conversation_id, "joined"),
            contracts.encode(AgentJoined(
                batch_id=meta.batch_id, conversation_id=meta.conversation_id, attempt=meta.attempt, room=room,
                role=role, job_id=ctx.job.id, identity=ctx.local_participant_identity, at=time.time())))
        if MODE == "leave":
            await asyncio.sleep(0.2)
            return
        await asyncio.sleep(TALK_S)
        if role == "support":
            await js.publish(
                subjects.conv_event(meta.batch_id, meta.conversation_id, "ended"),
                contracts.encode(ConversationEnded(
                    batch_id=meta.batch_id, conversation_id=meta.conversation_id, attempt=meta.attempt,
                    room=room, reason="end_conversation: support", ok=True, turns=2, role=role,
                    at=time.time(), lease=grant.lease)))
        else:
            await asyncio.sleep(0.5)  # the customer stays until the support agent has reported the end
    finally:
        if role is not None:
            with contextlib.suppress(Exception):
                await nc.request(subjects.ROLE_RELEASE, contracts.encode(RoleRelease(room=room, job_id=ctx.job.id)),
                                 timeout=2)
        await nc.close()
        ctx.shutdown("fake agent done")


JOBS = JobCounter()


async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = agent_server(entrypoint, agent_name=SETTINGS.agent_name, max_jobs=SETTINGS.worker_max_jobs,
                          shutdown_process_timeout=5.0)
    nc = await nats.connect(SETTINGS.nats_url)
    announcer = Announcer(nc, server, agent_name=SETTINGS.agent_name, max_jobs=SETTINGS.worker_max_jobs)

    def registered(worker_id: str, _info: object) -> None:
        if announcer.idle:
            announcer.start()
        print(f"READY {worker_id} {announcer.worker_id}", flush=True)

    server.on("worker_registered", registered)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(server.run(devmode=False))
    await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    await announcer.close()
    await server.aclose()
    await announcer.stop()
    await nc.close()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


if __name__ == "__main__":
    asyncio.run(main())
