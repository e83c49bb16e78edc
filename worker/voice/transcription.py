"""An agent's words on ``lk.transcription``, streamed in chunks of at most a few per second.

livekit-agents' room transcription output writes every LLM delta as its own data-stream chunk: one
FFI round trip and one data packet per token, delivered to every participant (the peer agent
included) and, in the receiving worker, to every room of that process. Measured on 200
conversations at concurrency 100 (benchmarks/README.md): with per-token chunks 1.84 CPU-s per
conversation and turn p50 2.3 s; without them 1.10 CPU-s and 0.73 s. This output keeps what a
person watching the room sees (the turn appears as it is generated, on the standard topic and
attributes, one stream per turn, closed with ``lk.transcription_final=true``) and writes what has
accumulated at most every ``interval_s``; the rest goes out when the turn ends.
"""

from __future__ import annotations

import asyncio
import logging
import time

from livekit import rtc
from livekit.agents.utils import shortuuid
from livekit.agents.voice import io

from shared.log import kv

log = logging.getLogger("worker.transcription")

TOPIC = "lk.transcription"
ATTR_FINAL = "lk.transcription_final"
ATTR_SEGMENT = "lk.segment_id"
DEFAULT_INTERVAL_S = 0.25


class CoalescedTranscription(io.TextOutput):
    def __init__(self, room: rtc.Room, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        super().__init__(label="crosstalk-transcription", next_in_chain=None)
        self._room = room
        self._interval = interval_s
        self._pending: list[str] = []
        self._writer: rtc.TextStreamWriter | None = None
        self._segment = ""
        self._last_write = 0.0
        self._lock = asyncio.Lock()  # one write or close at a time, in order
        self._closing: set[asyncio.Task[None]] = set()
        self.chunks_written = 0

    async def capture_text(self, text: str) -> None:
        if not text:
            return
        self._pending.append(text)
        # the first words open the stream at once; after that, at most one chunk per interval
        if self._writer is None or time.monotonic() - self._last_write >= self._interval:
            async with self._lock:
                await self._write_pending()

    def flush(self) -> None:
        """The turn's text is complete: write what is left and close its stream as final.

        The turn's writer and text are taken now, so the next turn's words open a new stream.
        """
        writer, text, segment = self._writer, "".join(self._pending), self._segment
        self._writer, self._pending = None, []
        if writer is None and not text:
            return
        task = asyncio.get_running_loop().create_task(self._close(writer, text, segment))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Wait for the streams being closed (the job calls this before leaving the room)."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _open(self) -> tuple[rtc.TextStreamWriter, str]:
        segment = shortuuid("SG_")
        writer = await self._room.local_participant.stream_text(
            topic=TOPIC, attributes={ATTR_FINAL: "false", ATTR_SEGMENT: segment})
        return writer, segment

    async def _write_pending(self) -> None:
        if not self._pending or not self._room.isconnected():
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            if self._writer is None:
                self._writer, self._segment = await self._open()
            await self._writer.write(text)
            self.chunks_written += 1
        except Exception as exc:  # the room went away mid-turn: the turn itself is recorded elsewhere
            log.warning("cannot publish transcription", extra=kv(error=str(exc)))
        self._last_write = time.monotonic()

    async def _close(self, writer: rtc.TextStreamWriter | None, text: str, segment: str) -> None:
        async with self._lock:
            if not self._room.isconnected():
                return
            try:
                if writer is None:  # a turn shorter than its first write
                    writer, segment = await self._open()
                if text:
                    await writer.write(text)
                    self.chunks_written += 1
                await writer.aclose(attributes={ATTR_FINAL: "true", ATTR_SEGMENT: segment})
            except Exception as exc:
                log.warning("cannot publish transcription", extra=kv(error=str(exc)))
