"""crosstalk's customer against the user's own agent (``batch.start`` ``target_agent``); text mode
here, voice mode's differences in worker/simulator_voice.py.

This job plays LiveKit's simulator for an unmodified agent (the *target*; livekit-agents 1.8.9,
checked against livekit-server 1.13.5, docs/ARCHITECTURE.md "Testing your own agent"):

* it never joins as the job's own (agent) participant: RoomIO ignores agents, so the customer
  joins with a token of its own as a standard participant ``sim-<job id>`` carrying the
  ``lk.simulator`` attribute; when it leaves, livekit-agents ends the target's job;
* once in the room, it dispatches the target (worker/target_dispatch.py), so the target finds the
  customer in the room when it joins; that dispatch carries ``lk.simulator.dispatch``: the
  target's ``ctx.simulation_context()`` has the scenario and ``userdata``, and in text mode its
  session drops STT/TTS/VAD by itself;
* the customer writes on ``lk.chat`` as a person typing would, and reads the target's words on
  ``lk.transcription`` (worker/target_link.py); a reply ends as worker/target_reply.py says;
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
  scenario's checks decide (worker/target_reply.py ``left_reason``).

Everything the target says is a turn. The customer speaks once the target is quiet (``listening``
for ``target_link.QUIET_S``), so a greeting the target says on its own is over by then: it is turn
0 (``support``, ``unprompted``) and the customer's first turn answers it. What the target says
later while no customer turn waits for it (a follow-up after its answer) is a turn of its own too,
in order: the target may speak several turns in a row (worker/turns.py ``Turns.peer_turn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

from livekit import api, rtc
from livekit.agents import Agent, AgentSession, JobContext
from nats.js import JetStreamContext

from shared import contracts, voiceplan
from shared.config import Settings
from shared.contracts import HeardVia, JobMetadata, RoleRequest
from shared.log import kv
from shared.scenarios import Scenario
from worker import lease, target_dispatch
from worker import session as sessions
from worker.agents import agent_for
from worker.bridge import ATTR_ROLE
from worker.conversation import Conversation
from worker.reports import Reports
from worker.target_link import TargetLink
from worker.target_reply import Reply, left_reason, overdue_reason
from worker.turns import End

log = logging.getLogger("worker.simulator")

ATTR_SIMULATOR = "lk.simulator"  # livekit-agents' ATTRIBUTE_SIMULATOR
CONNECT_TIMEOUT_S = 20.0
# The target's last words travel on the data channel, its leaving on the signalling connection: the
# leave may arrive while its last segment is still being read. This long for those reads to finish.
LEFT_READ_S = 2.0
# A reply read in full when the target left is recorded before the end (voice mode: once heard,
# which waits for the STT: worker/simulator_voice.py STT_GRACE_S); past this, the end goes without it.
LEFT_RECORD_S = 15.0


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


class SimConversation(Conversation):
    """:class:`Conversation` with the target as the peer: its replies are turns this job records."""

    def __init__(self, *, reports: Reports, link: TargetLink, keeper: lease.LeaseKeeper, reply_s: float) -> None:
        super().__init__(reports=reports, bridge=link, lease=keeper)  # type: ignore[arg-type]
        self.link = link
        self.reply_s = reply_s
        self.target_turns = 0
        self.target: Reports | None = None  # the support side's reports, under the lease held for the target
        self.session: AgentSession | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.span: tuple[float, float] | None = None  # voice: where the customer's last turn lies in the room
        # what the target said on its own before its lease was held (a greeting): recorded first
        self._early: list[Reply] | None = []
        self._recorded = asyncio.Event()  # a target turn was recorded
        link.on_reply = self.on_reply
        link.on_sent = self.on_sent
        link.on_unprompted = self.on_unprompted

    def on_sent(self, turn: int) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(self.reply_s, self._overdue)

    def _overdue(self) -> None:
        reason = overdue_reason(self.target_turns, self.link.agent_name, self.reply_s, "CROSSTALK_TARGET_REPLY_S")
        self.finish(End(reason, ok=False, mine=True))

    def on_reply(self, reply: Reply) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._track(self._heard(reply))

    def on_unprompted(self, said: Reply) -> None:
        if self._early is not None:
            self._early.append(said)
            return
        self._track(self._record(said, prompted=False))

    async def record_early(self) -> str:
        """Record what the target said before its lease was held; the text the customer answers first."""
        assert self._early is not None
        said: list[str] = []
        while self._early:
            first = self._early.pop(0)
            await self._record(first, prompted=False)
            said.append(first.text)
        self._early = None  # no await since the list was last seen empty: nothing is left behind
        return "\n".join(said)

    async def _heard(self, reply: Reply, heard: str | None = None, span: tuple[float, float] | None = None,
                     via: HeardVia | None = None) -> None:
        """The target's answer, in full: its own words, and in voice mode what the customer heard, and where."""
        await self._record(reply, prompted=True, heard=heard, span=span, via=via)

    async def _record(self, said: Reply, *, prompted: bool, heard: str | None = None,
                      span: tuple[float, float] | None = None, via: HeardVia | None = None) -> None:
        """A target turn: an answer (``prompted``: the customer answers it in turn) or said on its own."""
        async with self._speaking:
            if self.done.done() or self.target is None:
                return
            held = self.target.lease
            if held is not None and not held.valid():
                self.finish(End(f"lease_lost: support, held for the target: {held.lost or 'not renewed in time'}",
                                ok=False, mine=True))
                return
            turn, end = self.turns.peer_turn(time.time(), prompted=prompted)
            span = span if prompted else self.unprompted_span()
            await self.target.turn(turn, said.text, started_at=said.started_at or said.sent_at,
                                   ended_at=said.ended_at or time.time(),
                                   first_token_s=said.first_token_s if prompted else None,
                                   audio_start_s=self._offset(span[0]) if span else None,
                                   audio_end_s=self._offset(span[1]) if span else None,
                                   heard_text=heard, heard_via=via, unprompted=not prompted)
            if prompted:
                self.target_turns += 1
            self._recorded.set()
            if end is not None:
                self.finish(end._replace(mine=True))
            elif prompted and self.session is not None and not self.turns.alone:
                self.answer(said, heard)

    def answer(self, reply: Reply, heard: str | None) -> None:
        """The customer's next turn, in answer to the target's words (text mode: as published)."""
        assert self.session is not None
        self.session.generate_reply(user_input=reply.text)

    def unprompted_span(self) -> tuple[float, float] | None:
        """Voice mode: where the target's unprompted turn lies in the room's audio, taken so that its
        speech is not counted in the next answer's span (text mode: nowhere)."""
        return None

    def _offset(self, at: float | None) -> float | None:
        """A wall time as an offset in the recording (voice mode: :mod:`worker.simulator_voice`)."""
        return None

    def turn_audio(self) -> dict[str, Any]:
        span = self.span
        return {"audio_start_s": self._offset(span[0]), "audio_end_s": self._offset(span[1])} if span else {}

    def on_peer_left(self, participant: rtc.RemoteParticipant) -> None:
        peer = self.link.peer
        if peer is None or participant.identity != peer.identity or self.done.done():
            return
        self.turns.peer_gone()  # the customer says nothing more, whatever its model still produces
        if self._deadline is not None:
            self._deadline.cancel()
        # Was a customer turn waiting for its answer when it left (decided now, not after the reads)?
        # An answer already complete but not yet recorded answered it.
        asked = self.turns.waiting and self.link.answered == self.target_turns
        self._track(self._target_left(peer.identity, asked=asked, answered=self.link.answered))

    async def _target_left(self, identity: str, *, asked: bool, answered: int) -> None:
        await self.link.settle(LEFT_READ_S)
        if asked and self.link.answered > answered:
            asked = False  # its answer completed while the last reads came in
        reply = self.link.take_read() if asked else None
        if reply is not None:  # it said its answer and hung up before its state came back to listening
            asked = False
            self._recorded.clear()
            self.on_reply(reply)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recorded.wait(), LEFT_RECORD_S)
        reason, ok = left_reason(asked=asked, answered=self.link.answered, agent=self.link.agent_name,
                                 identity=identity)
        async with self._speaking:  # a turn being recorded is in the transcript before the end is reported
            self.finish(End(reason, ok=ok, mine=True))

    async def start_session(self, settings: Settings, agent: Agent, peer: rtc.RemoteParticipant) -> None:
        """Text mode: the session reads and writes through this class (no room I/O of its own)."""
        assert self.session is not None
        await self.session.start(agent, record=False, session_host=False)

    async def store_recording(self, js: JetStreamContext, meta: JobMetadata) -> None:
        """Voice mode's recording (text mode: none)."""

    async def aclose(self) -> None:
        """What voice mode opened besides the session (text mode: nothing)."""

    def finish(self, end: End) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().finish(end)


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
    from worker import simulator_voice  # builds on this module's SimConversation

    return simulator_voice.SimVoiceConversation(
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
