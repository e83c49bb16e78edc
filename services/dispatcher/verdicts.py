"""Answer a ``batch.start`` request with the verdict the durable consumer reached on the same body.

A command stored in ``BATCH_CMDS`` has no reply subject, so the dispatcher
also listens on ``batch.start`` with a core subscription and pairs each request
with the verdict on an identical body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import defaultdict, deque

from shared.contracts import BatchReply


class Verdicts:
    """Pairs a request on ``batch.start`` with the verdict the durable consumer reached on the same body.

    Bodies are matched by sha256, first come first served among identical
    bodies. A verdict that arrives before its request is kept for a few seconds.
    """

    def __init__(self, keep_s: float = 5.0) -> None:
        self._waiters: dict[str, deque[asyncio.Future[BatchReply]]] = defaultdict(deque)
        self._early: dict[str, deque[tuple[float, BatchReply]]] = defaultdict(deque)
        self._keep_s = keep_s

    @staticmethod
    def _key(body: bytes) -> str:
        return hashlib.sha256(body).hexdigest()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in list(self._early):
            q = self._early[key]
            while q and q[0][0] < now:
                q.popleft()
            if not q:
                del self._early[key]

    async def wait(self, body: bytes, timeout: float) -> BatchReply | None:
        key = self._key(body)
        self._expire()
        early = self._early.get(key)
        if early:
            reply = early.popleft()[1]
            if not early:
                del self._early[key]
            return reply
        fut: asyncio.Future[BatchReply] = asyncio.get_running_loop().create_future()
        self._waiters[key].append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            q = self._waiters.get(key)
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(fut)
                if not q:
                    del self._waiters[key]

    def settle(self, body: bytes, reply: BatchReply) -> None:
        key = self._key(body)
        q = self._waiters.get(key)
        while q:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(reply)
                return
        self._early[key].append((time.monotonic() + self._keep_s, reply))
