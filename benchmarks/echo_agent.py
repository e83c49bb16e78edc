"""A minimal livekit-agents worker for ``lk perf agent-load-test``: join the room, stay, leave.

    LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret \\
        python -m benchmarks.echo_agent --agent-name lk-echo [--max-jobs 250] [--announce]

``lk perf agent-load-test --agent-name NAME`` (livekit-cli) joins each room as an
``echo-participant`` publishing an echo track, creates an explicit dispatch for NAME and
measures the time from the dispatch API call returning to an AGENT participant appearing
in the room. This worker registers under NAME and does the least an agent can do there:
connect (no subscriptions, nothing published), stay, and shut the job down once no
non-agent participant is left, so it is the baseline for what a dispatch-to-join costs on
this server and this machine. Its ``AgentServer`` is the crosstalk worker's own
(``worker.lifecycle.server.agent_server``: thread executor, load shaping, idle runners) so the two are comparable.

``--announce`` sets one participant attribute right after connecting, as an
``AgentSession`` does with ``lk.agent.state``. That matters for what lk measures:
livekit-server v1.13 tells the other participants about a participant that publishes
nothing only on a 3 s ticker per room (``subscriberUpdateInterval`` in pkg/rtc/room.go),
while an attribute change is broadcast at once, so a silent connect-only agent shows a
join delay of "3 s minus the time since the room was created" whatever the dispatch cost.

Prints one JSON line ``{"event": "registered", ...}`` on stdout once livekit-server has
accepted the worker (lk_compare.py waits for it); logs are JSON on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time

from livekit import rtc
from livekit.agents import AgentServer, AutoSubscribe, JobContext

from shared import bus
from shared.log import kv, setup
from worker.lifecycle.server import agent_server, serve

log = logging.getLogger("echo_agent")

CONNECT_TIMEOUT_S = 20.0
# Measured with livekit 1.1.21 on the thread executor: two jobs of one process calling
# Room.connect at the same moment both hang, so connects are serialized per process
# (the same pattern as worker/job.py connect_room).
_CONNECT_LOCK = threading.Lock()


def has_other_humans(room: rtc.Room) -> bool:
    """Whether a non-agent participant (lk's echo-participant) is still in the room."""
    return any(p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT for p in room.remote_participants.values())


ANNOUNCE_ATTRIBUTE = "crosstalk.echo"


async def entrypoint(ctx: JobContext, *, announce: bool) -> None:
    t0 = time.monotonic()
    await asyncio.to_thread(_CONNECT_LOCK.acquire)
    try:
        await asyncio.wait_for(ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE), CONNECT_TIMEOUT_S)
    finally:
        _CONNECT_LOCK.release()
    if announce:
        await ctx.room.local_participant.set_attributes({ANNOUNCE_ATTRIBUTE: "ready"})
    log.info("joined", extra=kv(room=ctx.room.name, connect_s=round(time.monotonic() - t0, 3)))

    def on_left(_p: rtc.RemoteParticipant) -> None:
        if not has_other_humans(ctx.room):
            ctx.shutdown(reason="echo participant left")

    ctx.room.on("participant_disconnected", on_left)
    if not has_other_humans(ctx.room):  # it left before we subscribed to the event
        ctx.shutdown(reason="no participant to echo")


def build(agent_name: str, max_jobs: int, announce: bool,
          url: str, key: str, secret: str) -> AgentServer:
    async def session(ctx: JobContext) -> None:
        await entrypoint(ctx, announce=announce)

    return agent_server(session, agent_name=agent_name, max_jobs=max_jobs, ws_url=url, api_key=key,
                        api_secret=secret, shutdown_process_timeout=10.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent-name", default="lk-echo", help="agent name lk dispatches to (--agent-name of lk)")
    ap.add_argument("--max-jobs", type=int, default=250, help="jobs at which the worker reports full load")
    ap.add_argument("--announce", action="store_true",
                    help="set a participant attribute after connecting (as AgentSession does)")
    args = ap.parse_args(argv)
    if not args.agent_name.strip():
        ap.error("--agent-name: must not be empty")
    if args.max_jobs < 1:
        ap.error(f"--max-jobs: must be >= 1, got {args.max_jobs}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup("echo-agent")
    env = {k: os.environ.get(k, "") for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")}
    missing = [k for k, v in env.items() if not v]
    if missing:
        print(f"echo_agent: {', '.join(missing)}: not set (the LiveKit server to register with)", file=sys.stderr)
        raise SystemExit(2)
    server = build(args.agent_name, args.max_jobs, args.announce,
                   env["LIVEKIT_URL"], env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"])

    @server.on("worker_registered")
    def _registered(worker_id: str, _info: object) -> None:
        print(json.dumps({"event": "registered", "worker_id": worker_id, "agent_name": args.agent_name}), flush=True)

    async def run(stop: asyncio.Event) -> None:
        if await serve(server, stop):
            await server.aclose()

    bus.run(run)


if __name__ == "__main__":
    main()
