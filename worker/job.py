"""One worker job: ask for a role, join, talk, report, leave.

Flow: decode the dispatch metadata -> ``role.request`` (denied: leave at once; worker/lifecycle/lease.py)
-> connect -> announce role -> wait for the peer agent -> start an ``AgentSession`` linked to
the peer (worker/pair/session.py) -> announce ready -> the customer speaks first once the support
agent is ready -> every assistant message is recorded as a ``TurnRecorded`` event
(worker/lifecycle/reports.py) and sent to the peer, turn by turn as worker/lifecycle/turns.py decides
(worker/pair/conversation.py) -> the call ends on ``end_conversation`` or ``max_turns`` -> report
the end, release the lease, shut the job down. Against the user's own agent (``target_agent``) the
job is crosstalk's customer calling it instead: the same role request and lease, then
worker/simulator/customer.py ``talk`` in place of ``talk`` below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from livekit.agents import AutoSubscribe, JobContext
from nats.js import JetStreamContext

from shared import batch_plan, bus, contracts, scenarios, voiceplan
from shared.config import Settings, routed
from shared.contracts import JobMetadata, RoleRequest
from shared.log import kv
from shared.metrics import WorkerMetrics
from shared.scenario_files import ScenarioFileError
from shared.scenarios import Scenario
from worker.lifecycle import lease
from worker.lifecycle.reports import Reports
from worker.pair import session
from worker.pair.bridge import RoomBridge, peer_role
from worker.pair.conversation import Conversation
from worker.pair.voice_conversation import VoiceConversation
from worker.simulator import customer as simulator
from worker.voice import recorder

log = logging.getLogger("worker.job")

CONNECT_TIMEOUT_S = 20.0


async def connect_room(ctx: JobContext, voice: bool = False) -> None:
    # voice mode: the room's audio tracks (the peer agent's microphone; the room holds only the two agents)
    subscribe = AutoSubscribe.AUDIO_ONLY if voice else AutoSubscribe.SUBSCRIBE_NONE
    await asyncio.wait_for(ctx.connect(auto_subscribe=subscribe), CONNECT_TIMEOUT_S)


async def run(ctx: JobContext, settings: Settings, metrics: WorkerMetrics) -> None:
    job_id, room = ctx.job.id, ctx.job.room.name
    try:
        meta = contracts.decode(ctx.job.metadata.encode(), JobMetadata)
        scenario = batch_plan.job_scenario(meta, scenarios.library(), embed_script=not settings.real_model)
        settings = routed(settings, has_script=bool(scenario.script))  # CROSSTALK_MODEL: this scenario's model
    except (contracts.ContractError, KeyError, ScenarioFileError) as exc:
        log.error("bad job metadata", extra=kv(job_id=job_id, room=room, error=str(exc)))
        metrics.jobs.labels("bad_metadata").inc()
        ctx.shutdown(f"bad job metadata: {exc}")
        return

    marks = {"start": time.monotonic()}  # what the join costs, step by step: the "ready announced" line
    nc = await bus.connect(settings.nats_url, f"worker-job-{job_id}")
    marks["nats"] = time.monotonic()
    js = nc.jetstream(timeout=10)

    async def publish(subject: str, msg: Any, msg_id: str | None = None) -> None:
        await bus.publish(js, subject, msg, msg_id=msg_id)

    try:
        # against a user's agent (target_agent) this job is the customer, as its own standard participant
        request = (RoleRequest(room=room, job_id=job_id, identity=simulator.identity(job_id), prefer="customer")
                   if meta.target_agent else
                   RoleRequest(room=room, job_id=job_id, identity=ctx.local_participant_identity))
        keeper = await lease.acquire(nc, request, settings.lease_s)
        if isinstance(keeper, str):
            log.info("role denied, leaving", extra=kv(job_id=job_id, room=room, reason=keeper))
            metrics.jobs.labels("denied").inc()
            ctx.shutdown(f"role denied: {keeper}")
            return
        marks["role"] = time.monotonic()
        reports = Reports(publish, meta=meta, room=room, role=keeper.role, metrics=metrics, lease=keeper)
        async with keeper.kept():
            try:
                if meta.target_agent:
                    await simulator.talk(ctx, settings, meta, scenario, reports, keeper, marks, js)
                else:
                    await talk(ctx, settings, meta, scenario, reports, keeper, marks, js)
            except Exception as exc:
                log.exception("job failed", extra=kv(job_id=job_id, room=room))
                metrics.jobs.labels("error").inc()
                await reports.failed(exc)
    except Exception:
        log.exception("job failed", extra=kv(job_id=job_id, room=room))
        metrics.jobs.labels("error").inc()
    finally:
        await nc.drain()
        ctx.shutdown("conversation over")


async def talk(ctx: JobContext, settings: Settings, meta: JobMetadata, scenario: Scenario, reports: Reports,
               keeper: lease.LeaseKeeper, marks: dict[str, float], js: JetStreamContext) -> None:
    """Join the room, meet the peer, hold the conversation, report its end (when this side does)."""
    role, room = reports.role, reports.room
    await connect_room(ctx, voice=meta.mode == "voice")
    bridge = RoomBridge(ctx.room, role)
    marks["connected"] = time.monotonic()
    await bridge.announce()
    conv = conversation(settings, meta, scenario, reports, keeper, bridge)
    keeper.on_lost(conv.on_lease_lost)

    peer = await bridge.wait_for_peer(ready=False, timeout=settings.join_deadline_s)
    marks["peer"] = time.monotonic()
    bridge.on_control(conv.on_control)
    ctx.room.on("participant_disconnected", conv.on_peer_left)

    live = await session.start(ctx, settings, meta, role, scenario, conv, peer)
    if isinstance(conv, VoiceConversation):
        await conv.listening(settings.join_deadline_s)
    marks["session"] = time.monotonic()
    await bridge.announce(ready=True)
    marks["ready"] = time.monotonic()
    log.info("ready announced", extra=kv(room=room, role=role, **{
        f"{k}_s": round(v - marks["start"], 3) for k, v in marks.items()}))
    await reports.joined(ctx.job.id, ctx.local_participant_identity)
    reports.metrics.jobs.labels("started").inc()

    if role == "customer":
        # The first words must not be sent before the support agent listens.
        await bridge.wait_for_peer(ready=True, timeout=settings.join_deadline_s)
        conv.turns.heard_at = time.time()
        live.agent.generate_reply()

    end = await conv.wait(settings.conversation_timeout_s)
    if isinstance(conv, VoiceConversation) and conv.tap is not None:
        # this listener's recording of the peer's channel, before the end is reported: the sink
        # merges the two channels (services/sink/recordings.py)
        try:
            await recorder.upload(js, conv.tap, meta, peer_role(role), conv.origin)
        except Exception:
            log.exception("could not store the recording", extra=kv(room=room, role=role))
    if end.mine:
        await reports.ended(end, conv.turns.count)
    reports.metrics.jobs.labels("completed" if end.ok else "failed").inc()
    log.info("conversation ended", extra=kv(room=room, role=role, reason=end.reason, ok=end.ok))
    await live.aclose()


def conversation(settings: Settings, meta: JobMetadata, scenario: Scenario, reports: Reports,
                 keeper: lease.LeaseKeeper, bridge: RoomBridge) -> Conversation:
    """Text mode's conversation, or voice mode's with this role's voice plan (worker/voice/speech.py)."""
    if meta.mode != "voice":
        return Conversation(reports=reports, bridge=bridge, lease=keeper)
    p = voiceplan.plan(scenario, reports.role, meta.language, settings)
    return VoiceConversation(reports=reports, bridge=bridge, lease=keeper, plan=p,
                             min_silence_s=settings.vad_min_silence_s)
