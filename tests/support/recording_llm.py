"""A recording OpenAI-compatible endpoint for the tests: every request to ``/v1/*`` is appended to a
JSONL file, then forwarded to the real endpoint (the stack's scripted model) and its answer streamed
back unchanged.

Point an agent's ``OPENAI_BASE_URL`` at :attr:`RecordingLLM.base_url` and the file holds what the
agent asked its model, request by request, in the order they arrived: the ground truth of what
each agent carried as the conversation. It runs an aiohttp server on its own event loop in a
thread, so a test's loop (or none) does not matter; the upstream can be set once it is known
(the stack's model port), before the first request.

    with RecordingLLM(tmp / "requests.jsonl") as rec:     # rec.base_url: http://127.0.0.1:<port>/v1
        rec.upstream = "http://127.0.0.1:8088/v1"
        ... rec.requests() ...
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from support.servers import free_port

# headers an agent sends that say who is asking (crosstalk's worker names its conversation)
KEPT_HEADERS = ("X-Crosstalk-Conversation", "User-Agent")
# hop-by-hop or recomputed: never copied between the two legs
_SKIP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


class RecordingLLM:
    def __init__(self, log: Path, upstream: str | None = None, host: str = "127.0.0.1") -> None:
        self.log = log
        self.upstream = upstream  # an OpenAI base URL ending in /v1
        self.host = host
        self.port = free_port()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="recording-llm", daemon=True)
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> RecordingLLM:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=15)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)

    def requests(self, path_suffix: str = "/chat/completions") -> list[dict[str, Any]]:
        """The recorded requests whose path ends with ``path_suffix``, in arrival order."""
        if not self.log.exists():
            return []
        with self._lock:
            lines = self.log.read_text(encoding="utf-8").splitlines()
        return [r for r in map(json.loads, lines) if r["path"].endswith(path_suffix)]

    async def _start(self) -> None:
        # no total timeout: a streamed completion lasts as long as the model takes
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/v1/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    def _record(self, request: web.Request, body: bytes) -> None:
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None  # multipart or binary: the path and headers say enough
        line = json.dumps({"at": time.time(), "method": request.method, "path": request.path,
                           "headers": {h: request.headers[h] for h in KEPT_HEADERS if h in request.headers},
                           "body": parsed}, ensure_ascii=False)
        with self._lock, open(self.log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._record(request, body)
        if self.upstream is None or self._client is None:
            return web.json_response({"error": {"message": "recording proxy: no upstream set"}}, status=503)
        url = self.upstream.rstrip("/") + "/" + request.match_info["tail"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        async with self._client.request(request.method, url, params=request.query, data=body,
                                        headers=headers) as up:
            out = web.StreamResponse(status=up.status, headers={k: v for k, v in up.headers.items()
                                                                if k.lower() not in _SKIP})
            await out.prepare(request)
            async for chunk in up.content.iter_any():  # as it comes: the model's pacing passes through
                await out.write(chunk)
            await out.write_eof()
            return out
