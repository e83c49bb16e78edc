"""One agent's live conversation: room and session events in, turn-taking decisions out, effects run.

:class:`worker.lifecycle.turns.Turns` decides (reply or not, which turn, when the call ends);
this class feeds it what the room and the ``AgentSession`` report and does what it decides:
records the turn (worker/lifecycle/reports.py), sends it to the peer (worker/pair/bridge.py), ends the call.
Each turn is recorded before the peer hears it, so a turn the peer answers is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.llm import ChatMessage, LLMError
from livekit.agents.voice import room_io
from livekit.agents.voice.events import ConversationItemAddedEvent, ErrorEvent

from shared.log import kv
from worker.lifecycle import turns
from worker.lifecycle.lease import LeaseKeeper
from worker.lifecycle.reports import Reports
from worker.lifecycle.turns import End, Speak, Turns
from worker.pair.bridge import ATTR_TURN, RoomBridge

log = logging.getLogger("worker.job")


class Conversation:
    def __init__(self, *, reports: Reports, bridge: RoomBridge, lease: LeaseKeeper | None = None) -> None:
        self.reports = reports
        self.role = reports.role
        self.room = reports.room
        self.bridge = bridge
        # The role's lease: every turn carries its token, and none is published once it may have ended.
        self.lease = lease
        self.turns = Turns(reports.role, reports.meta.max_turns, heard_at=time.time())
        self.done: asyncio.Future[End] = asyncio.get_running_loop().create_future()
        self._speaking = asyncio.Lock()
        self._pending: set[asyncio.Task[Any]] = set()
        # how long a requested end waits for the goodbye turn (text: its message; voice: its speech)
        self.end_grace_s = 2.2

    # -- events from the room / session ------------------------------------------------

    def turn_of(self, ev: room_io.TextInputEvent) -> int | None:
        """The turn index a peer message carries (None, logged, if it has none)."""
        attrs = (ev.info.attributes if ev.info is not None else None) or {}
        try:
            return int(attrs.get(ATTR_TURN, ""))
        except ValueError:
            log.warning("peer message without turn index", extra=kv(room=self.room))
            return None

    async def on_peer_text(self, session: AgentSession, ev: room_io.TextInputEvent) -> None:
        if self.done.done():
            return
        heard = self.turn_of(ev)
        if heard is None:
            return
        end = self.turns.heard(heard, at=time.time())
        if end is not None:
            self.finish(end)
            return
        session.generate_reply(user_input=ev.text)

    def on_item(self, ev: ConversationItemAddedEvent) -> None:
        item = ev.item
        if not isinstance(item, ChatMessage) or item.role != "assistant":
            return
        text = (item.text_content or "").strip()
        if not text or self.done.done():
            return
        self._track(self._speak(text, item.metrics.get("llm_node_ttft")))

    def on_error(self, ev: ErrorEvent) -> None:
        """An unrecoverable model error ends the call failed, before its partial reply is recorded.

        livekit-agents adds the text streamed before a broken completion (the model process died
        mid-stream: found by ``just chaos``, kill-model) to the chat as an ordinary assistant
        message; recording that as a turn would store a cut sentence the model never served in
        full. The error is emitted before that message is added, so ending here drops it; the
        dispatcher retries the conversation. Recoverable errors (retried by the LLM) are ignored.
        """
        err = ev.error
        if isinstance(err, LLMError) and not err.recoverable:
            self.finish(turns.model_failed(self.role, err.error))

    def request_end(self, reason: str) -> None:
        """Called by the end_conversation tool; the goodbye text of the same reply goes out first."""
        self.turns.request_end(reason)
        self._track(self._end_soon(reason))

    def on_control(self, msg: dict[str, str], sender: str) -> None:
        end = self.turns.control(msg)
        if end is not None:
            self.finish(end)

    def on_peer_left(self, participant: rtc.RemoteParticipant) -> None:
        if self.bridge.peer is not None and participant.identity == self.bridge.peer.identity:
            self.finish(turns.peer_left(self.role))

    def on_lease_lost(self, why: str) -> None:
        """Renewal refused, or not renewed before the lease may have expired: stop speaking, end failed."""
        self.finish(End(f"lease_lost: {why}", ok=False, mine=True))

    def finish(self, end: End) -> None:
        end = self.turns.finish(end)
        if not self.done.done():
            self.done.set_result(end)

    async def wait(self, timeout_s: float) -> End:
        try:
            return await asyncio.wait_for(self.done, timeout_s)
        except TimeoutError:
            return turns.TIMEOUT

    # -- effects -------------------------------------------------------------------------

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
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
            self.finish(turns.turn_failed(self.role, exc))

    async def _speak(self, text: str, first_token_s: float | None) -> None:
        async with self._speaking:
            lost = None
            if self.lease is not None and not self.lease.valid():
                lost = self.lease.lost or "not renewed in time"
            now = time.time()
            decision = self.turns.speak(now, first_token_s, lease_lost=lost)
            if isinstance(decision, End):
                self.finish(decision)
                return
            if decision is None:
                return
            await self._say(decision, text, now, first_token_s)

    async def _say(self, speak: Speak, text: str, now: float, first_token_s: float | None) -> None:
        # Durable record first, then the peer hears it: a turn the peer answers is never lost.
        await self.reports.turn(speak.turn, text, started_at=speak.started_at, ended_at=now,
                                first_token_s=first_token_s, **self.turn_audio())
        end = self.turns.spoken(speak.turn)
        if end is None:
            await self.bridge.send_turn(text, speak.turn)
            return
        # The end goes out before the last words, so the peer never starts a reply to them.
        await self.bridge.send_control("end", reason=end.reason)
        await self.bridge.send_turn(text, speak.turn)
        self.finish(end)

    def turn_audio(self) -> dict[str, Any]:
        """Where this agent's turn lies in the recording (voice modes that know it; text: nothing)."""
        return {}

    async def _end_soon(self, reason: str) -> None:
        # The tool may run before or after the goodbye message is added: give that message
        # end_grace_s to be recorded and sent (its own turn then ends the call, the end being requested).
        await asyncio.wait({self.done}, timeout=self.end_grace_s)
        async with self._speaking:
            if not self.done.done():
                await self.bridge.send_control("end", reason=reason)
                self.finish(End(reason, ok=True, mine=True))
