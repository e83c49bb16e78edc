"""One worker job: ask for a role, join, talk, report, leave.

Flow: decode the dispatch metadata -> ``role.request`` (denied: leave at once)
-> connect -> announce role -> wait for the peer agent -> start an
``AgentSession`` whose RoomIO links to the peer (AGENT participants accepted,
text in/out, no audio, no VAD) -> announce ready -> the customer speaks first once
the support agent is ready -> every assistant message is sent to the peer, shown
as a transcription, and published as a ``TurnRecorded`` event -> the call ends on
``end_conversation`` or ``max_turns`` -> release the lease, shut the job down.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import httpx2
import openai
from livekit import rtc
from livekit.agents import AgentSession, AutoSubscribe, JobContext
from livekit.agents.llm import ChatMessage
from livekit.agents.voice import room_io
from livekit.agents.voice.events import ConversationItemAddedEvent
from livekit.plugins import openai as lk_openai
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from shared import bus, contracts, scenarios, subjects
from shared.config import Settings
from shared.contracts import (
    AgentJoined,
    ConversationEnded,
    JobMetadata,
    Role,
    RoleReply,
    RoleRequest,
    TurnRecorded,
)
from shared.log import kv
from shared.metrics import WorkerMetrics
from worker.agents import agent_for
from worker.bridge import ATTR_TURN, RoomBridge, peer_role
from worker.lease import LeaseKeeper
from worker.transcription import CoalescedTranscription

log = logging.getLogger("worker.job")

CONNECT_TIMEOUT_S = 20.0

# One TLS context per process: building one loads the CA store (0.1-0.2 s of CPU, measured in the
# worker's loop-blocked warnings), which livekit-plugins-openai would otherwise do for every job.
_TLS = ssl.create_default_context()


def model_client(settings: Settings, conversation: str | None = None) -> openai.AsyncClient:
    """The OpenAI-compatible client of one job (scripted model by default, a real one when configured).

    ``conversation`` (``<batch>/<conversation>/<attempt>``) goes along as a header, so the scripted
    model's served log can be compared with the transcripts (a real API ignores it).
    """
    return openai.AsyncClient(
        api_key=settings.model_api_key,
        base_url=settings.model_base_url,
        max_retries=0,
        default_headers={"X-Crosstalk-Conversation": conversation} if conversation else None,
        http_client=httpx2.AsyncClient(
            verify=_TLS,
            timeout=httpx2.Timeout(connect=15.0, read=30.0, write=5.0, pool=5.0),
            follow_redirects=True,
            limits=httpx2.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=120),
        ),
    )


async def connect_room(ctx: JobContext) -> None:
    await asyncio.wait_for(ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE), CONNECT_TIMEOUT_S)


async def request_role(nc: Client, req: RoleRequest, *, within_s: float = 20.0) -> RoleReply:
    """``role.request`` with retry while no allocator answers (one may be restarting)."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(within_s),
        wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
        retry=retry_if_exception_type((NatsTimeoutError, NoRespondersError, asyncio.TimeoutError)),
        reraise=True,
    ):
        with attempt:
            msg = await nc.request(subjects.ROLE_REQUEST, contracts.encode(req), timeout=3)
            return contracts.decode(msg.data, RoleReply)
    raise RuntimeError("unreachable")


class Conversation:
    """Turn accounting and the end of the call for one agent of one conversation."""

    def __init__(
        self,
        *,
        meta: JobMetadata,
        role: Role,
        room: str,
        bridge: RoomBridge,
        publish: Any,
        metrics: WorkerMetrics,
        lease: LeaseKeeper | None = None,
    ) -> None:
        self.meta = meta
        # The role's lease: every turn carries its token, and none is published once it may have ended.
        self.lease = lease
        self.role = role
        self.room = room
        self.bridge = bridge
        self.publish = publish
        self.metrics = metrics
        self.session: AgentSession | None = None
        # The customer speaks turn 0; turns alternate, so the next index is known locally.
        self.next_turn = 0 if role == "customer" else 1
        self.last_turn = -1
        self.heard_at = time.time()
        self.end_requested: str | None = None
        self.done: asyncio.Future[tuple[str, bool, bool]] = asyncio.get_running_loop().create_future()
        self._speaking = asyncio.Lock()
        self._pending: set[asyncio.Task[Any]] = set()

    # -- events from the room / session ------------------------------------------------

    async def on_peer_text(self, session: AgentSession, ev: room_io.TextInputEvent) -> None:
        if self.done.done():
            return
        attrs = ev.info.attributes if ev.info is not None else {}
        try:
            heard = int(attrs.get(ATTR_TURN, ""))
        except ValueError:
            log.warning("peer message without turn index", extra=kv(room=self.room))
            return
        self.heard_at = time.time()
        self.next_turn = heard + 1
        self.last_turn = max(self.last_turn, heard)
        if self.next_turn >= self.meta.max_turns:
            self.finish("max_turns", ok=True, mine=False)
            return
        session.generate_reply(user_input=ev.text)

    def on_item(self, ev: ConversationItemAddedEvent) -> None:
        item = ev.item
        if not isinstance(item, ChatMessage) or item.role != "assistant":
            return
        text = (item.text_content or "").strip()
        if not text or self.done.done():
            return
        task = asyncio.ensure_future(self._speak(text, item))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(self._observe)

    def _observe(self, task: asyncio.Future[Any]) -> None:
        """A turn that fails (its publish, the bridge...) ends the conversation now, with the reason."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("turn failed", exc_info=exc, extra=kv(room=self.room, role=self.role))
            self.finish(f"agent_error: {self.role}: turn failed: {type(exc).__name__}: {exc}"[:300],
                        ok=False, mine=True)

    async def _speak(self, text: str, item: ChatMessage) -> None:
        async with self._speaking:
            if self.done.done():
                return
            if self.lease is not None and not self.lease.valid():
                # Never speak on a lease that may have ended: the role may be someone else's.
                self.finish(f"lease_lost: {self.lease.lost or 'not renewed in time'}", ok=False, mine=True)
                return
            turn = self.next_turn
            if turn >= self.meta.max_turns:
                return
            self.next_turn = turn + 2
            self.last_turn = max(self.last_turn, turn)
            now = time.time()
            ttft = item.metrics.get("llm_node_ttft")
            started = self.heard_at if turn > 0 else now - (ttft or 0.0)
            ev = TurnRecorded(
                batch_id=self.meta.batch_id,
                conversation_id=self.meta.conversation_id,
                attempt=self.meta.attempt,
                turn=turn,
                role=self.role,
                text=text,
                started_at=started,
                ended_at=now,
                first_token_s=ttft,
                total_s=now - started,
                language=self.meta.language,
                room=self.room,
                lease=self.lease.lease if self.lease is not None else None,
            )
            # Durable record first, then the peer hears it: a turn the peer answers is never lost.
            await self.publish(
                subjects.conv_event(self.meta.batch_id, self.meta.conversation_id, "turn"),
                ev,
                msg_id=f"{self.meta.conversation_id}:{self.meta.attempt}:turn:{turn}",
            )
            self.metrics.turns.labels(self.role).inc()
            if ttft is not None:
                self.metrics.first_token.labels(self.role).observe(ttft)
            self.metrics.turn_seconds.labels(self.role).observe(now - started)
            if self.end_requested:
                await self.bridge.send_control("end", reason=self.end_requested)
                await self.bridge.send_turn(text, turn)
                self.finish(self.end_requested, ok=True, mine=True)
                return
            await self.bridge.send_turn(text, turn)
            if turn + 1 >= self.meta.max_turns:
                await self.bridge.send_control("end", reason="max_turns")
                self.finish("max_turns", ok=True, mine=True)

    def request_end(self, reason: str) -> None:
        """Called by the end_conversation tool; the goodbye text of the same reply goes out first."""
        self.end_requested = reason

        async def _end_soon() -> None:
            # The tool may run before or after the goodbye message is added; give it a moment.
            for _ in range(40):
                if self.done.done():
                    return
                if not self._pending and not self._speaking.locked():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            async with self._speaking:
                if not self.done.done():
                    await self.bridge.send_control("end", reason=reason)
                    self.finish(reason, ok=True, mine=True)

        task = asyncio.ensure_future(_end_soon())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(self._observe)

    def on_control(self, msg: dict[str, str], sender: str) -> None:
        if msg.get("kind") == "end":
            self.finish(str(msg.get("reason", "peer ended")), ok=True, mine=False)

    def on_peer_left(self, participant: rtc.RemoteParticipant) -> None:
        if self.bridge.peer is not None and participant.identity == self.bridge.peer.identity:
            self.finish(f"agent_left: {peer_role(self.role)}", ok=False, mine=True)

    def finish(self, reason: str, *, ok: bool, mine: bool) -> None:
        """``mine``: this agent reports the end (exactly one side does for a clean end)."""
        if not self.done.done():
            self.done.set_result((reason, ok, mine))

    @property
    def turns(self) -> int:
        """Turns spoken in this conversation so far (both roles)."""
        return min(self.last_turn + 1, self.meta.max_turns)


async def run(ctx: JobContext, settings: Settings, metrics: WorkerMetrics) -> None:
    job_id = ctx.job.id
    room_name = ctx.job.room.name
    try:
        meta = contracts.decode(ctx.job.metadata.encode(), JobMetadata)
        scenario = scenarios.get(meta.scenario)
    except (contracts.ContractError, KeyError) as exc:
        log.error("bad job metadata", extra=kv(job_id=job_id, room=room_name, error=str(exc)))
        metrics.jobs.labels("bad_metadata").inc()
        ctx.shutdown(f"bad job metadata: {exc}")
        return

    marks = {"start": time.monotonic()}
    nc = await bus.connect(settings.nats_url, f"worker-job-{job_id}")
    marks["nats"] = time.monotonic()
    js = nc.jetstream(timeout=10)

    async def publish(subject: str, msg: Any, msg_id: str | None = None) -> None:
        await bus.publish(js, subject, msg, msg_id=msg_id)

    identity = ctx.local_participant_identity
    lease_task: asyncio.Task[None] | None = None
    role: Role | None = None
    keeper: LeaseKeeper | None = None
    try:
        asked_at = time.monotonic()  # the lease surely lives lease_s from here (worker/lease.py)
        reply = await request_role(nc, RoleRequest(room=room_name, job_id=job_id, identity=identity))
        if reply.granted and reply.lease is None:
            log.error("grant without a lease token: cannot renew it, leaving", extra=kv(job_id=job_id, room=room_name))
            reply = RoleReply(granted=False, reason="grant without a lease token")
        if not reply.granted or reply.role is None:
            log.info("role denied, leaving", extra=kv(job_id=job_id, room=room_name, reason=reply.reason))
            metrics.jobs.labels("denied").inc()
            ctx.shutdown(f"role denied: {reply.reason}")
            return
        role = reply.role
        marks["role"] = time.monotonic()
        lease_s = reply.lease_s or settings.lease_s
        assert reply.lease is not None
        keeper = LeaseKeeper(nc, room=room_name, job_id=job_id, role=role, lease=reply.lease, lease_s=lease_s,
                             sent_at=asked_at)
        lease_task = asyncio.create_task(keeper.run())

        await connect_room(ctx)
        bridge = RoomBridge(ctx.room, role)
        marks["connected"] = time.monotonic()
        await bridge.announce()
        conv = Conversation(meta=meta, role=role, room=room_name, bridge=bridge, publish=publish, metrics=metrics,
                            lease=keeper)
        # Renewal refused, or not renewed before the lease may have expired: stop speaking, end failed.
        keeper.on_lost(lambda why: conv.finish(f"lease_lost: {why}", ok=False, mine=True))

        peer = await bridge.wait_for_peer(ready=False, timeout=settings.join_deadline_s)
        marks["peer"] = time.monotonic()
        bridge.on_control(conv.on_control)
        ctx.room.on("participant_disconnected", conv.on_peer_left)

        llm_client = model_client(settings, f"{meta.batch_id}/{meta.conversation_id}/{meta.attempt}")
        session: AgentSession = AgentSession(
            llm=lk_openai.LLM(model=settings.model_name, client=llm_client),
            vad=None,
            user_away_timeout=None,
            # text in, text out: no VAD, no turn detector model, no barge-in between the agents
            turn_handling={
                "turn_detection": None,
                "interruption": {"enabled": False},
                "preemptive_generation": {"enabled": False},
            },
        )
        conv.session = session
        session.on("conversation_item_added", conv.on_item)
        # what the agent says, on lk.transcription for anyone watching the room, a few chunks per
        # second instead of one data packet per token (worker/transcription.py)
        transcription = CoalescedTranscription(ctx.room)
        session.output.transcription = transcription
        await session.start(
            agent_for(role, scenario, meta.language, conv),
            room=ctx.room,
            record=False,
            # not a session host: nobody drives these sessions from a frontend, and hosting streams
            # every state change and chat item to the room (lk.agent.session), i.e. to the peer agent
            session_host=False,
            room_options=room_io.RoomOptions(
                text_input=room_io.TextInputOptions(text_input_cb=conv.on_peer_text),
                audio_input=False,
                audio_output=False,
                text_output=False,  # the transcription goes out through CoalescedTranscription (set above)
                participant_kinds=[rtc.ParticipantKind.PARTICIPANT_KIND_AGENT],
                participant_identity=peer.identity,
                close_on_disconnect=False,
            ),
        )
        marks["session"] = time.monotonic()
        await bridge.announce(ready=True)
        marks["ready"] = time.monotonic()
        log.info("ready announced", extra=kv(room=room_name, role=role, **{
            f"{k}_s": round(v - marks["start"], 3) for k, v in marks.items()}))
        await publish(
            subjects.conv_event(meta.batch_id, meta.conversation_id, "joined"),
            AgentJoined(batch_id=meta.batch_id, conversation_id=meta.conversation_id, attempt=meta.attempt,
                        room=room_name, role=role, job_id=job_id, identity=identity, at=time.time()),
            msg_id=f"{meta.conversation_id}:{meta.attempt}:joined:{role}",
        )
        metrics.jobs.labels("started").inc()

        if role == "customer":
            # The first words must not be sent before the support agent listens.
            await bridge.wait_for_peer(ready=True, timeout=settings.join_deadline_s)
            conv.heard_at = time.time()
            session.generate_reply()

        try:
            reason, ok, mine = await asyncio.wait_for(conv.done, settings.conversation_timeout_s)
        except TimeoutError:
            reason, ok, mine = "conversation_timeout", False, True
        if mine:
            await publish(
                subjects.conv_event(meta.batch_id, meta.conversation_id, "ended"),
                ConversationEnded(batch_id=meta.batch_id, conversation_id=meta.conversation_id,
                                  attempt=meta.attempt, room=room_name, reason=reason, ok=ok,
                                  turns=conv.turns, role=role, at=time.time(), lease=keeper.lease),
                msg_id=f"{meta.conversation_id}:{meta.attempt}:ended",
            )
        metrics.jobs.labels("completed" if ok else "failed").inc()
        log.info("conversation ended", extra=kv(room=room_name, role=role, reason=reason, ok=ok))
        await session.aclose()
        await transcription.aclose()
        await llm_client.close()
    except Exception as exc:
        log.exception("job failed", extra=kv(job_id=job_id, room=room_name))
        metrics.jobs.labels("error").inc()
        if role is not None:
            try:
                await publish(
                    subjects.conv_event(meta.batch_id, meta.conversation_id, "ended"),
                    ConversationEnded(batch_id=meta.batch_id, conversation_id=meta.conversation_id,
                                      attempt=meta.attempt, room=room_name,
                                      reason=f"agent_error: {role}: {type(exc).__name__}", ok=False,
                                      turns=0, role=role, at=time.time(),
                                      lease=keeper.lease if keeper is not None else None),
                    msg_id=f"{meta.conversation_id}:{meta.attempt}:ended",
                )
            except Exception:
                log.exception("could not report the failure")
    finally:
        if lease_task is not None:
            lease_task.cancel()
        if role is not None:
            try:
                await nc.request(subjects.ROLE_RELEASE,
                                 contracts.encode(contracts.RoleRelease(room=room_name, job_id=job_id)), timeout=3)
            except Exception as exc:
                log.warning("role release failed (the lease will expire)", extra=kv(error=str(exc)))
        await nc.drain()
        ctx.shutdown("conversation over")
