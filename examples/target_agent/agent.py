"""Acme support: a LiveKit voice agent written as a production one is, to be tested by crosstalk.

Nothing here knows crosstalk. It is an ordinary livekit-agents worker (agent name
``acme-support``, explicit dispatch) with STT, LLM and TTS from livekit-plugins-openai,
configured by the usual OPENAI_* variables. When a job runs under a simulator (LiveKit's, or
crosstalk's ``target_agent`` batches) ``ctx.simulation_context()`` returns the scenario: the
agent then adds the scenario's ``userdata`` (say, the caller's account on file) to its
instructions, and in text mode livekit-agents drops STT/TTS/VAD by itself.

    python examples/target_agent/agent.py start      # LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET

Settings (environment):
    ACME_AGENT_NAME        agent name to register (default acme-support)
    ACME_LLM_MODEL         chat model (default gpt-4o-mini)
    ACME_MAX_JOBS          report full at this many jobs (default: livekit-agents' CPU-based load)
    ACME_EXECUTOR          process (default) | thread: where jobs run
    ACME_HEALTH_PORT       the worker's health/HTTP port (default 8081; 0 picks a free one)
    ACME_JOB_LOG           append one JSON line per job start, reply and job end (what this agent saw and said)
    ACME_GREETING          say this first, before the caller speaks (as many production agents do)
    ACME_SPEECH_BASE_URL   OpenAI-compatible speech API for STT/TTS (default: the same as the LLM's)
    ACME_STT_MODEL         transcription model (default gpt-4o-mini-transcribe)
    ACME_TTS_MODEL         speech model (default gpt-4o-mini-tts)
    ACME_TTS_VOICE         speech voice (default ash)

Test knobs (misbehaviour on purpose, for the failure tests): ACME_NEVER_SPEAK=1 never answers;
ACME_STOP_AFTER=N stops answering after N replies; ACME_LEAVE_AFTER=N leaves the room when
spoken to after N replies, leaving the caller waiting for an answer. (They act in ``llm_node``,
which every reply goes through, typed or spoken.) ACME_HANG_UP=1 is no misbehaviour: it offers the
model an ``end_conversation`` tool that hangs up once its goodbye has played out, as production
agents end calls. For the ground-truth tests: ACME_REPLY_DELAY_S=X holds every reply X seconds before
asking the model (a slower LLM, in ``llm_node``); ACME_STATE_LOG=<file> appends one JSON line per
``user_state_changed`` / ``agent_state_changed`` session event (room, wall time, old and new
state): the agent's own view of when the caller stopped speaking and when it began to answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterable

from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    AgentStateChangedEvent,
    ChatContext,
    ChatMessage,
    JobContext,
    JobExecutorType,
    ModelSettings,
    RunContext,
    UserStateChangedEvent,
    cli,
    function_tool,
    llm,
)
from livekit.plugins import openai, silero

log = logging.getLogger("acme-support")

AGENT_NAME = os.environ.get("ACME_AGENT_NAME", "acme-support")
BASE_INSTRUCTIONS = (
    "You are Acme Bank's support agent. Verify the caller before changing anything, never ask for a "
    "full password or PIN, and keep each reply to one or two short sentences."
)
_log_lock = threading.Lock()


def record(**fields: object) -> None:
    """One JSON line in ACME_JOB_LOG (what this agent saw and said), if set."""
    path = os.environ.get("ACME_JOB_LOG")
    if not path:
        return
    line = json.dumps({"at": time.time(), **fields}, ensure_ascii=False)
    with _log_lock, open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else None


def _float_env(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else None


def log_states(session: AgentSession, room: str, path: str) -> None:
    """ACME_STATE_LOG: one JSON line per user/agent state change of ``session``, as the agent saw it.

    ``at`` is the wall time the handler ran (``time.time()``); ``created_at`` the event's own stamp.
    """
    def write(kind: str, ev: UserStateChangedEvent | AgentStateChangedEvent) -> None:
        line = json.dumps({"at": time.time(), "event": kind, "room": room, "old": ev.old_state,
                           "new": ev.new_state, "created_at": ev.created_at})
        with _log_lock, open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    session.on("user_state_changed", lambda ev: write("user_state_changed", ev))
    session.on("agent_state_changed", lambda ev: write("agent_state_changed", ev))


HANG_UP_PAUSE_S = 0.5


class AcmeSupport(Agent):
    def __init__(self, ctx: JobContext, instructions: str) -> None:
        hang_up = function_tool(self._hang_up, name="end_conversation",
                                description="End the call once the caller has what they needed and you said goodbye.")
        super().__init__(instructions=instructions, tools=[hang_up] if os.environ.get("ACME_HANG_UP") == "1" else [])
        self._ctx = ctx
        self.replies = 0

    async def _hang_up(self, context: RunContext) -> None:
        """ACME_HANG_UP: hang up as a production agent does, the goodbye played out, then leave the room."""
        await context.wait_for_playout()
        await asyncio.sleep(HANG_UP_PAUSE_S)  # a breath before hanging up: the goodbye's last packets go out first
        record(event="hanging_up", room=self._ctx.room.name, replies=self.replies)
        # Leave the room from inside the tool: while a tool runs the agent stays "thinking"
        # (livekit-agents sets "listening" only once its tools are done), so the caller never sees it
        # listening for another turn after the goodbye. The job's shutdown alone leaves only after
        # the session closes, which waits for the speech this tool belongs to.
        await self._ctx.room.disconnect()
        self._ctx.shutdown(reason="the agent ended the call")

    async def llm_node(
        self, chat_ctx: ChatContext, tools: list[llm.Tool], model_settings: ModelSettings
    ) -> AsyncIterable[llm.ChatChunk | str]:
        leave_after = _int_env("ACME_LEAVE_AFTER")
        stop_after = _int_env("ACME_STOP_AFTER")
        if leave_after is not None and self.replies >= leave_after:
            record(event="leaving", room=self._ctx.room.name, replies=self.replies)
            self._ctx.shutdown(reason="test knob ACME_LEAVE_AFTER")
            return
        if os.environ.get("ACME_NEVER_SPEAK") == "1" or (stop_after is not None and self.replies >= stop_after):
            return
        self.replies += 1
        if delay := _float_env("ACME_REPLY_DELAY_S"):
            await asyncio.sleep(delay)  # a slower model: the agent is "thinking" meanwhile
        async for chunk in Agent.default.llm_node(self, chat_ctx, tools, model_settings):
            yield chunk


def build_server() -> AgentServer:
    max_jobs = _int_env("ACME_MAX_JOBS")
    thread = os.environ.get("ACME_EXECUTOR", "process") == "thread"
    if thread:
        # livekit-rtc's FFI client is created lazily without a lock: create it before job threads race for it
        from livekit.rtc._ffi_client import FfiClient

        FfiClient.instance  # noqa: B018
    server = AgentServer(
        job_executor_type=JobExecutorType.THREAD if thread else JobExecutorType.PROCESS,
        port=int(os.environ.get("ACME_HEALTH_PORT", "8081")),
        # a common production choice: full at a number of calls rather than at a CPU share; the load
        # reaches livekit-server's agents.target_load (0.7) exactly at max_jobs calls
        load_fnc=(lambda s: min(1.0, 0.7 * len(s.active_jobs) / max_jobs)) if max_jobs else None,
        load_threshold=0.7 - 1e-6,
        # warm runners accept a burst of job requests at once (with none, simultaneous requests are refused)
        num_idle_processes=min(max_jobs, 8) if max_jobs else 2,
    )
    server.rtc_session(entrypoint, agent_name=AGENT_NAME)
    return server


_vad_lock = threading.Lock()
_vad_model: silero.VAD | None = None


def _vad() -> silero.VAD:
    """Silero VAD, loaded once per process (its model ships in livekit-plugins-silero)."""
    global _vad_model
    with _vad_lock:
        if _vad_model is None:
            _vad_model = silero.VAD.load()
        return _vad_model


async def _ended(ctx: JobContext, reason: str) -> None:
    record(event="ended", room=ctx.room.name, job_id=ctx.job.id, reason=str(reason))


async def entrypoint(ctx: JobContext) -> None:
    instructions = BASE_INSTRUCTIONS
    sim = ctx.simulation_context()
    if sim is not None:
        userdata = sim.userdata()
        instructions += f"\nCaller's records on file: {json.dumps(userdata, ensure_ascii=False)}"
        record(event="job", room=ctx.room.name, job_id=ctx.job.id, metadata=ctx.job.metadata,
               simulation={"run_id": sim.simulation_run_id, "job_id": sim.simulation_job_id,
                           "label": sim.scenario.label, "mode": int(sim.simulation_mode), "userdata": userdata,
                           "tags": dict(sim.scenario.tags)})
    else:
        record(event="job", room=ctx.room.name, job_id=ctx.job.id, metadata=ctx.job.metadata, simulation=None)
    ctx.add_shutdown_callback(lambda reason="": _ended(ctx, reason))
    await ctx.connect()

    # the speech API: OPENAI_BASE_URL (as the LLM's) unless ACME_SPEECH_BASE_URL names another
    speech = {"base_url": url} if (url := os.environ.get("ACME_SPEECH_BASE_URL")) else {}
    session: AgentSession = AgentSession(
        # Silero VAD cuts the caller's speech; each utterance goes to the transcription endpoint
        vad=_vad(),
        stt=openai.STT(model=os.environ.get("ACME_STT_MODEL", "gpt-4o-mini-transcribe"), use_realtime=False, **speech),
        llm=openai.LLM(model=os.environ.get("ACME_LLM_MODEL", "gpt-4o-mini")),
        tts=openai.TTS(model=os.environ.get("ACME_TTS_MODEL", "gpt-4o-mini-tts"),
                       voice=os.environ.get("ACME_TTS_VOICE", "ash"), **speech),
    )

    if state_log := os.environ.get("ACME_STATE_LOG"):
        log_states(session, ctx.room.name, state_log)

    @session.on("conversation_item_added")
    def said(ev: object) -> None:
        item = getattr(ev, "item", None)
        if isinstance(item, ChatMessage) and item.role == "assistant" and item.text_content:
            record(event="reply", room=ctx.room.name, identity=ctx.room.local_participant.identity,
                   text=item.text_content)

    await session.start(AcmeSupport(ctx, instructions), room=ctx.room)
    if greeting := os.environ.get("ACME_GREETING", ""):
        # session.start returns before RoomIO has linked the caller and set up its outputs (livekit-agents
        # 1.8.9, RoomIO._init_task): a greeting said before then never reaches the room's transcription
        # (seen here: one greeting in three lost under load)
        await session.room_io.wait_for_ready()
        session.say(greeting)


if __name__ == "__main__":
    cli.run_app(build_server())
