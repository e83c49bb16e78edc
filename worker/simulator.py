"""crosstalk's customer against the user's own agent (``batch.start`` ``target_agent``), text mode.

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
  ``lk.transcription``; a reply ends as worker/target_reply.py says;
* the support role is the target's: this job asks ``role.request`` for it on the target's behalf
  (job id = the target's LiveKit job id, identity = the target's identity) once the target is in
  the room and ready, renews it while the conversation lasts and releases it at the end, so the
  allocator's log and the room audit see one customer and one support. Each target turn is
  published with that lease's token, so the sink's fencing holds for both sides;
* this job reports every end (the target reports nothing): ``target_no_show`` (never joined
  within ``CROSSTALK_TARGET_JOIN_S``), ``target_silent`` / ``target_unresponsive`` (no reply
  within ``CROSSTALK_TARGET_REPLY_S``), ``target_left`` (left before the end).

The customer speaks first, once the target is quiet (``listening`` for ``QUIET_S``): a greeting
the target says on its own is over by then. Text the target publishes while nobody asked (a
greeting) is not a turn: it is counted and logged, never stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
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
from worker.target_reply import Reply, overdue_reason
from worker.turns import End

log = logging.getLogger("worker.simulator")

ATTR_SIMULATOR = "lk.simulator"  # livekit-agents' ATTRIBUTE_SIMULATOR
ATTR_AGENT_STATE = "lk.agent.state"
ATTR_AGENT_NAME = "lk.agent.name"
ATTR_SEGMENT = "lk.segment_id"
ATTR_TRACK = "lk.transcribed_track_id"
TOPIC_CHAT = "lk.chat"
TOPIC_TRANSCRIPTION = "lk.transcription"
CONNECT_TIMEOUT_S = 20.0
# livekit-agents publishes lk.agent.state once its session's RoomIO reads lk.chat; a message sent
# before that is dropped. An agent that never publishes a state is taken as ready this long after joining.
READY_GRACE_S = 3.0
QUIET_S = 0.5
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


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


class TargetLink:
    """The room as the simulated customer sees it: the target agent, its state, its replies.

    Duck-types :class:`worker.bridge.RoomBridge` for :class:`Conversation` (``peer``,
    ``send_turn``, ``send_control``).
    """

    def __init__(self, room: rtc.Room, agent_name: str, voice: bool = False) -> None:
        self.room = room
        self.agent_name = agent_name
        self.voice = voice  # the customer speaks through its microphone track, never on lk.chat
        self.peer: rtc.RemoteParticipant | None = None
        self.reply: Reply | None = None
        self.on_reply: Callable[[Reply], None] = lambda reply: None
        self.on_sent: Callable[[int], None] = lambda turn: None
        self.unsolicited = 0
        self._reads: set[asyncio.Future[None]] = set()
        room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_stream)
        room.on("participant_attributes_changed", self._on_attributes)

    def is_target(self, p: rtc.RemoteParticipant) -> bool:
        name = p.attributes.get(ATTR_AGENT_NAME)
        return p.kind == AGENT and (name is None or name == self.agent_name)

    async def wait_ready(self, timeout: float) -> rtc.RemoteParticipant | None:
        """The target once it can hear the customer and is quiet (None if it never joined within ``timeout``).

        Quiet: ``listening`` for ``QUIET_S`` with none of its text being read, so a greeting it says on
        its own (not a turn: counted, logged) is over before the customer's first words, and is
        never taken for the answer to them.
        """
        loop = asyncio.get_running_loop()
        deadline, seen = loop.time() + timeout, {}
        quiet_since: float | None = None
        while loop.time() < deadline:
            for p in list(self.room.remote_participants.values()):
                if not self.is_target(p):
                    continue
                now = loop.time()
                first = seen.setdefault(p.identity, now)
                state = p.attributes.get(ATTR_AGENT_STATE)
                if state is None:
                    if now - first >= READY_GRACE_S:  # an agent that publishes no state
                        self.peer = p
                        return p
                    continue
                self.peer = p  # its text is read (and counted) from now on
                if state != "listening" or self._reads:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= QUIET_S:
                    return p
            await asyncio.sleep(0.05)
        return None

    async def send_turn(self, text: str, turn: int) -> None:
        assert self.peer is not None
        # the reply may arrive before send_text returns: expect it first
        self.reply = Reply(time.time(), self.peer.attributes.get(ATTR_AGENT_STATE))
        if self.voice:  # its speech has played out: the target heard it in the room
            self.on_sent(turn)
            return
        await self.room.local_participant.send_text(text, topic=TOPIC_CHAT, destination_identities=[self.peer.identity])
        self.on_sent(turn)

    async def send_control(self, kind: str, **fields: str) -> None:
        """Nothing to say: the target learns the call is over when the customer leaves (its job ends then)."""

    def _on_stream(self, reader: rtc.TextStreamReader, sender: str) -> None:
        if self.peer is None or sender != self.peer.identity:
            return
        track = (reader.info.attributes or {}).get(ATTR_TRACK)
        if track and track not in self.peer.track_publications:
            return  # the target's transcription of someone else's track (what its STT heard), not its words
        reply = self.reply
        if reply is None:
            self.unsolicited += 1
            log.info("target text while nobody asked: not a turn", extra=kv(room=self.room.name, sender=sender))
        else:
            reply.opened(time.time())
        segment = reader.info.attributes.get(ATTR_SEGMENT) or reader.info.stream_id

        async def read() -> None:
            try:
                text = await reader.read_all()
            except Exception:
                if reply is not None:
                    reply.failed()
                    self._check(reply)
                return
            if reply is not None:
                reply.closed(segment, text, time.time())
                self._check(reply)

        task = asyncio.ensure_future(read())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    def _on_attributes(self, changed: dict[str, str], p: rtc.Participant) -> None:
        reply = self.reply
        if reply is not None and self.peer is not None and p.identity == self.peer.identity and ATTR_AGENT_STATE in changed:
            reply.state = changed[ATTR_AGENT_STATE]
            self._check(reply)

    def _check(self, reply: Reply) -> None:
        if reply is not self.reply or not reply.complete():
            return
        if not reply.text.strip():  # an empty transcription is no answer: keep waiting for one
            self.reply = Reply(reply.sent_at, reply.state)
            return
        self.reply = None
        self.on_reply(reply)


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
        link.on_reply = self.on_reply
        link.on_sent = self.on_sent

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

    async def _heard(self, reply: Reply, heard: str | None = None, span: tuple[float, float] | None = None,
                     via: HeardVia | None = None) -> None:
        """The target's turn, in full: its own words, and in voice mode what the customer heard, and where."""
        async with self._speaking:
            if self.done.done() or self.target is None:
                return
            held = self.target.lease
            if held is not None and not held.valid():
                self.finish(End(f"lease_lost: support, held for the target: {held.lost or 'not renewed in time'}",
                                ok=False, mine=True))
                return
            turn = self.turns.next_turn - 1  # the customer spoke turn t; the target answers t + 1
            await self.target.turn(turn, reply.text, started_at=reply.started_at or reply.sent_at,
                                   ended_at=reply.ended_at or time.time(), first_token_s=reply.first_token_s,
                                   audio_start_s=self._offset(span[0]) if span else None,
                                   audio_end_s=self._offset(span[1]) if span else None,
                                   heard_text=heard, heard_via=via)
            self.target_turns += 1
            end = self.turns.heard(turn, at=time.time())
            if end is not None:
                self.finish(end._replace(mine=True))
            elif self.session is not None:
                self.answer(reply, heard)

    def answer(self, reply: Reply, heard: str | None) -> None:
        """The customer's next turn, in answer to the target's words (text mode: as published)."""
        assert self.session is not None
        self.session.generate_reply(user_input=reply.text)

    def _offset(self, at: float | None) -> float | None:
        """A wall time as an offset in the recording (voice mode: :mod:`worker.simulator_voice`)."""
        return None

    def turn_audio(self) -> dict[str, Any]:
        span = self.span
        return {"audio_start_s": self._offset(span[0]), "audio_end_s": self._offset(span[1])} if span else {}

    def on_peer_left(self, participant: rtc.RemoteParticipant) -> None:
        peer = self.link.peer
        if peer is not None and participant.identity == peer.identity:
            self.finish(End(f"target_left: agent {self.link.agent_name!r} ({peer.identity}) left the room after "
                            f"{self.target_turns} turn(s)", ok=False, mine=True))

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
        log.info("customer left", extra=kv(room=reports.room, unsolicited=link.unsolicited, **{
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
            conv.turns.heard_at = time.time()
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
