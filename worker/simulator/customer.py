"""crosstalk's customer against the user's own agent (``batch.start`` ``target_agent``); text mode
here, voice mode's differences in worker/simulator/voice_conversation.py.

This job plays LiveKit's simulator for an unmodified agent (the *target*; livekit-agents 1.8.9,
checked against livekit-server 1.13.5, docs/ARCHITECTURE.md "Testing your own agent"):

* it never joins as the job's own (agent) participant: RoomIO ignores agents, so the customer
  joins with a token of its own as a standard participant ``sim-<job id>`` carrying the
  ``lk.simulator`` attribute; when it leaves, livekit-agents ends the target's job;
* once in the room, it dispatches the target (worker/simulator/target_dispatch.py), so the target finds the
  customer in the room when it joins; that dispatch carries ``lk.simulator.dispatch``: the
  target's ``ctx.simulation_context()`` has the scenario and ``userdata``, and in text mode its
  session drops STT/TTS/VAD by itself;
* the customer writes on ``lk.chat`` as a person typing would, and reads the target's words on
  ``lk.transcription`` (worker/simulator/target_link.py); a reply ends as worker/simulator/target_reply.py says;
* the support role is the target's: this job asks ``role.request`` for it on the target's behalf
  (job id = the target's LiveKit job id, identity = the target's identity) once the target is in
  the room and ready, renews it while the conversation lasts and releases it at the end, so the
  allocator's log and the room audit see one customer and one support. Each target turn is
  published with that lease's token, so the sink's fencing holds for both sides;
* this job reports every end (the target reports nothing): ``target_no_show`` (never joined
  within ``CROSSTALK_TARGET_JOIN_S``), ``target_silent`` / ``target_unresponsive`` (no reply
  within ``CROSSTALK_TARGET_REPLY_S``), ``target_left`` (left with a reply owed, or before
  answering anything). A target that leaves after answering the last thing said has ended the
  call, as agents do: the conversation ends ``end_conversation: support (...)``, ok, and the
  scenario's checks decide (worker/simulator/target_reply.py ``left_reason``).

Everything the target says is a turn. The customer speaks once the target is quiet (``listening``
for ``target_link.QUIET_S``), so a greeting the target says on its own is over by then: it is turn
0 (``support``, ``unprompted``) and the customer's first turn answers it. What the target says
later while no customer turn waits for it (a follow-up after its answer) is a turn of its own too,
in order: the target may speak several turns in a row (worker/lifecycle/turns.py ``Turns.peer_turn``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from livekit import api, rtc
from livekit.agents import JobContext
from nats.js import JetStreamContext

from shared import contracts, voiceplan
from shared.config import Settings
from shared.contracts import JobMetadata, RoleRequest
from shared.log import kv
from shared.scenarios import Scenario
from worker.lifecycle import lease
from worker.lifecycle.reports import Reports
from worker.lifecycle.turns import End
from worker.pair.agents import agent_for
from worker.pair.bridge import ATTR_ROLE
from worker.simulator import target_dispatch
from worker.simulator.conversation import SimConversation
from worker.simulator.target_link import TargetLink
from worker.simulator.voice_conversation import SimVoiceConversation
from worker.voice import session as sessions

log = logging.getLogger("worker.simulator")

ATTR_SIMULATOR = "lk.simulator"  # livekit-agents' ATTRIBUTE_SIMULATOR
CONNECT_TIMEOUT_S = 20.0


def identity(job_id: str) -> str:
    return f"sim-{job_id}"


def target_job_id(target_identity: str) -> str:
    """The job id the target's lease is held under: its LiveKit job id when its identity is
    livekit-agents' default ``agent-<job id>``, else a stable token derived from the identity."""
    tail = target_identity.removeprefix("agent-")
    if tail != target_identity and contracts.is_token(tail):
        return tail
    return "target-" + hashlib.sha256(target_identity.encode()).hexdigest()[:16]


def customer_token(settings: Settings, room: str, ident: str) -> str:
    return (api.AccessToken(settings.livekit_api_key, settings.livekit_api_secret)
            .with_identity(ident).with_name("crosstalk customer")
            .with_attributes({ATTR_SIMULATOR: "crosstalk", ATTR_ROLE: "customer"})
            .with_grants(api.VideoGrants(room_join=True, room=room)).to_jwt())


async def talk(ctx: JobContext, settings: Settings, meta: JobMetadata, scenario: Scenario, reports: Reports,
               keeper: lease.LeaseKeeper, marks: dict[str, float], js: JetStreamContext) -> None:
    """Join as the customer, meet the target, hold the conversation, report its end (always this side)."""
    assert meta.target_agent is not None
    if reports.role != "customer":  # prefer="customer" was not honoured: never play a role that is not ours
        await reports.ended(End(f"role_denied: granted {reports.role}, not customer", ok=False, mine=True), 0)
        return
    room = rtc.Room()
    link = TargetLink(room, meta.target_agent, voice=meta.mode == "voice")
    conv = conversation(settings, meta, scenario, reports, link, keeper)
    keeper.on_lost(conv.on_lease_lost)
    room.on("participant_disconnected", conv.on_peer_left)
    me = identity(ctx.job.id)
    await asyncio.wait_for(room.connect(settings.livekit_url, customer_token(settings, reports.room, me)),
                           CONNECT_TIMEOUT_S)
    marks["connected"] = time.monotonic()
    try:
        await reports.joined(ctx.job.id, me)
        try:  # only now: the target must find the customer in the room when it joins (target_dispatch.py)
            await target_dispatch.dispatch_target(settings, reports.room, meta, scenario)
        except Exception as exc:
            await reports.ended(End(f"target_no_show: could not dispatch agent {meta.target_agent!r}: "
                                    f"{type(exc).__name__}: {exc}"[:300], ok=False, mine=True), 0)
            return
        marks["dispatched"] = time.monotonic()
        peer = await link.wait_ready(settings.target_join_s)
        if peer is None:
            what = ("joined but was never listening" if link.peer is not None else "did not join")
            await reports.ended(End(
                f"target_no_show: agent {meta.target_agent!r} {what} within {settings.target_join_s:g} s "
                "(CROSSTALK_TARGET_JOIN_S): is a worker registered under that agent name, with room for a job?",
                ok=False, mine=True), 0)
            return
        marks["target"] = time.monotonic()
        await converse(ctx, settings, meta, scenario, conv, peer, js)
    finally:
        await room.disconnect()
        log.info("customer left", extra=kv(room=reports.room, unprompted=link.unprompted, **{
            f"{k}_s": round(v - marks["start"], 3) for k, v in marks.items()}))


def conversation(settings: Settings, meta: JobMetadata, scenario: Scenario, reports: Reports, link: TargetLink,
                 keeper: lease.LeaseKeeper) -> SimConversation:
    if meta.mode != "voice":
        return SimConversation(reports=reports, link=link, keeper=keeper, reply_s=settings.target_reply_s)
    return SimVoiceConversation(
        plan=voiceplan.plan(scenario, "customer", meta.language, settings), min_silence_s=settings.vad_min_silence_s,
        reports=reports, link=link, keeper=keeper, reply_s=settings.target_reply_s)


async def converse(ctx: JobContext, settings: Settings, meta: JobMetadata, scenario: Scenario,
                   conv: SimConversation, peer: rtc.RemoteParticipant, js: JetStreamContext) -> None:
    reports, keeper = conv.reports, conv.lease
    assert keeper is not None
    support = await lease.acquire(keeper.nc, RoleRequest(room=reports.room, job_id=target_job_id(peer.identity),
                                                         identity=peer.identity, prefer="support"), settings.lease_s)
    if isinstance(support, str):
        await reports.ended(End(f"role_denied: the support role for agent {meta.target_agent!r}: {support}",
                                ok=False, mine=True), 0, target_identity=peer.identity)
        return
    async with support.kept():
        support.on_lost(lambda why: conv.finish(End(f"lease_lost: support, held for the target: {why}",
                                                    ok=False, mine=True)))
        conv.target = Reports(reports.publish, meta=meta, room=reports.room, role="support",
                              metrics=reports.metrics, lease=support)
        await conv.target.joined(support.renew_msg.job_id, peer.identity)
        session, client, speech = sessions.new_session(settings, meta, conv)
        conv.session = session
        try:
            await conv.start_session(settings, agent_for("customer", scenario, meta.language, conv), peer)
            reports.metrics.jobs.labels("started").inc()
            greeting = await conv.record_early()
            conv.turns.heard_at = time.time()
            # the customer's first words answer the target's greeting, as a caller's would
            if greeting:
                session.generate_reply(user_input=greeting)
            else:
                session.generate_reply()
            end = await conv.wait(settings.conversation_timeout_s)
            await conv.store_recording(js, meta)  # voice: before the end is reported (the sink merges then)
            await reports.ended(end, conv.turns.count, target_identity=peer.identity)
            reports.metrics.jobs.labels("completed" if end.ok else "failed").inc()
            log.info("conversation ended", extra=kv(room=reports.room, target=peer.identity, reason=end.reason,
                                                    ok=end.ok))
        finally:
            await session.aclose()
            await conv.aclose()
            await client.close()
            if speech is not None:
                await speech.close()
