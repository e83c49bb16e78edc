"""The scripted model's HTTP wiring: an OpenAI-compatible server on aiohttp.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (streamed as SSE or not),
``GET /healthz``. The reply itself is decided by :mod:`services.model.core`; this
module only reads the request, paces the answer (time to first token, then tokens
per second) and writes it. Every stream is a coroutine on one event loop, so
hundreds of concurrent conversations cost no threads.

For tests and tools, :func:`serve_in_background` runs the server in-process::

    from services.model.main import serve_in_background

    async with serve_in_background(ttft_ms=0, tokens_per_s=1000) as base_url:
        llm = openai.LLM(model="crosstalk-scripted", base_url=base_url, api_key="x")
        ...

``base_url`` ends in ``/v1`` (what OpenAI clients expect); ``port=0`` picks a free port.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from shared.log import kv
from shared.metrics import ModelMetrics
from shared.scenarios import Scenario, library
from shared.webapp import serve_app

from . import core

log = logging.getLogger("model")

_enc = msgspec.json.Encoder()


# Sent by crosstalk's worker on every model call (``<batch_id>/<conversation_id>/<attempt>``), so what
# the model served can be compared with what the transcripts hold (the benchmarks' "lost" figure).
CONVERSATION_HEADER = "X-Crosstalk-Conversation"


@dataclass(frozen=True)
class ModelConfig:
    model_name: str = "crosstalk-scripted"
    ttft_ms: float = 150.0
    tokens_per_s: float = 400.0
    # JSONL file: one line per completion served in full (conversation, role, text); None: no log
    served_log: Path | None = None


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(obj), status=status, content_type="application/json")


def _default_lookup(scenario_id: str) -> Scenario | None:
    return library().get(scenario_id)


class ModelServer:
    def __init__(
        self,
        config: ModelConfig,
        metrics: ModelMetrics,
        lookup: Callable[[str], Scenario | None] = _default_lookup,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.lookup = lookup
        # prompts without crosstalk's marker (a user's own agent) are answered from every script
        self.scripts = lambda: library().values()
        self._served: IO[bytes] | None = None
        if config.served_log is not None:
            config.served_log.parent.mkdir(parents=True, exist_ok=True)
            self._served = open(config.served_log, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        if self._served is not None:
            self._served.close()

    def record(self, request: web.Request, reply: core.Reply) -> None:
        """One line per completion served in full: the ground truth of what the agents were given to say."""
        if self._served is None:
            return
        line = {"conversation": request.headers.get(CONVERSATION_HEADER), "role": reply.role, "text": reply.text,
                "end_call": reply.end_call, "at": time.time()}
        self._served.write(_enc.encode(line) + b"\n")  # one write() per line: lines never interleave

    def app(self) -> web.Application:
        # Chat contexts of long conversations stay far below this.
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.add_routes([  # the route table: OpenAI's chat API, as much of it as the agents call
            web.get("/healthz", self.healthz),
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
        ])
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return _json(core.models_list(self.config.model_name))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            req = core.decode_request(await request.read())
            reply = core.plan_reply(req, self.lookup, self.scripts)
        except core.RequestError as exc:
            log.warning("bad chat request", extra=kv(param=exc.param, reason=exc.reason))
            return _json(exc.body(), status=400)
        self.metrics.requests.labels(reply.role).inc()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        try:
            if req.stream:
                return await self._stream(request, req, reply, completion_id, call_id)
            response = await self._complete(req, reply, completion_id, call_id)
            self.record(request, reply)
            return response
        finally:
            self.metrics.request_seconds.observe(loop.time() - started)

    async def _complete(
        self, req: core.ChatRequest, reply: core.Reply, completion_id: str, call_id: str
    ) -> web.Response:
        tokens = core.tokenize(reply.text)
        await asyncio.sleep(self.config.ttft_ms / 1000 + max(len(tokens) - 1, 0) / self.config.tokens_per_s)
        body = core.completion(
            completion_id, int(time.time()), req.model, reply, call_id, core.count_tokens(req)
        )
        return _json(body)

    async def _stream(
        self,
        request: web.Request,
        req: core.ChatRequest,
        reply: core.Reply,
        completion_id: str,
        call_id: str,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        maker = core.ChunkMaker(completion_id, int(time.time()), req.model, include_usage=req.include_usage)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + _enc.encode(obj) + b"\n\n")

        tokens = core.tokenize(reply.text)
        try:
            await asyncio.sleep(self.config.ttft_ms / 1000)
            await send(maker.role())
            first = loop.time()
            for i, token in enumerate(tokens):
                # Pace against the first token's time so sleeps do not add up drift.
                delay = first + i / self.config.tokens_per_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send(maker.content(token))
            if reply.end_call:
                for chunk in maker.tool_call(call_id, reply.tool_name, reply.tool_args):
                    await send(chunk)
            await send(maker.finish(reply.finish_reason))
            if req.include_usage:
                await send(maker.usage(core.count_tokens(req), core.completion_tokens(reply)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.record(request, reply)
        except ConnectionResetError:
            log.info("client went away mid-stream", extra=kv(completion_id=completion_id))
        return resp


@asynccontextmanager
async def serve_in_background(
    host: str = "127.0.0.1",
    port: int = 0,
    ttft_ms: float = 0.0,
    tokens_per_s: float = 1000.0,
    *,
    model_name: str = "crosstalk-scripted",
    metrics: ModelMetrics | None = None,
    served_log: Path | None = None,
) -> AsyncIterator[str]:
    """Serve the scripted model on ``host:port`` in this event loop; yield its base URL.

    ``port=0`` picks a free port. Defaults are fast (no time to first token,
    1000 tokens/s) so tests stay quick; pass the latency you want to simulate.
    ``metrics`` defaults to a private registry, so several servers can run in one
    process. The server stops (open streams are cut) when the block exits.
    """
    server = ModelServer(
        ModelConfig(model_name=model_name, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, served_log=served_log),
        metrics or ModelMetrics(CollectorRegistry()),
    )
    try:
        async with serve_app(server.app(), host, port) as url:
            yield url
    finally:
        server.close()
