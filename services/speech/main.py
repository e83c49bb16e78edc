"""The speech service's HTTP wiring: OpenAI's audio API on aiohttp.

Routes: ``POST /v1/audio/speech`` (TTS), ``POST /v1/audio/transcriptions`` (STT), ``GET
/v1/audio/voices`` (the catalogue), ``GET /v1/models``, ``GET /healthz``. Requests are checked by
:mod:`services.speech.core`; the engines (:mod:`services.speech.engines`) run in a bounded thread
pool, so the event loop keeps answering while Piper or Whisper compute. ``pcm`` speech is
streamed sentence by sentence (the first sentence's audio leaves before the last is synthesised);
other formats are encoded whole.

For tests and tools, :func:`serve_in_background` runs the server in-process on loaded engines.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from shared import voices
from shared.log import kv
from shared.metrics import SpeechMetrics
from shared.openai_errors import RequestError
from shared.webapp import serve_app

from . import audio, core
from .engines import Engines

log = logging.getLogger("speech")
T = TypeVar("T")
_enc = msgspec.json.Encoder()


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = 4096
    max_upload_mb: float = 25.0


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(obj), status=status, content_type="application/json")


def _server_error(reason: str) -> web.Response:
    return _json({"error": {"message": reason, "type": "server_error", "param": None, "code": None}}, 500)


@web.middleware
async def _request_id(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """Every answer carries ``x-request-id``, as OpenAI's do (livekit-plugins-openai logs its absence)."""
    rid = f"req_{uuid.uuid4().hex}"
    request["request_id"] = rid
    resp: web.StreamResponse = await handler(request)
    if not resp.prepared:
        resp.headers.setdefault("x-request-id", rid)
    return resp


def _stream_headers(request: web.Request, content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "x-request-id": request["request_id"]}


class _Cut(Exception):
    """A pcm stream that ended early after its headers went out: ``outcome`` aborted (the client
    left) or error (the engine failed); nothing more can be sent but the end of the stream."""

    def __init__(self, response: web.StreamResponse, outcome: str) -> None:
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome


class SpeechServer:
    def __init__(self, engines: Engines, metrics: SpeechMetrics, limits: Limits = Limits(),
                 workers: int | None = None) -> None:
        self.engines = engines
        self.metrics = metrics
        self.limits = limits
        size = workers or engines.options.workers
        self.pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="speech")
        self._slots = asyncio.Semaphore(size)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the pool once a slot is free (the wait and the run are both on /metrics)."""
        self.metrics.waiting.inc()
        try:
            await self._slots.acquire()
        finally:
            self.metrics.waiting.dec()
        self.metrics.busy.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.metrics.busy.dec()
            self._slots.release()

    def app(self) -> web.Application:
        # uploads up to the limit, plus room for the form's text fields
        app = web.Application(client_max_size=int(self.limits.max_upload_mb * 1024 * 1024) + 64 * 1024,
                              middlewares=[_request_id])
        app.add_routes([  # the route table: OpenAI's audio API, plus the voice catalogue
            web.get("/healthz", self.healthz),
            web.get("/v1/models", self.models),
            web.get("/v1/audio/voices", self.voices),
            web.post("/v1/audio/speech", self.speech),
            web.post("/v1/audio/transcriptions", self.transcriptions),
        ])
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "crosstalk"}
                for m in (voices.TTS_MODEL, voices.STT_MODEL)]
        return _json({"object": "list", "data": data})

    async def voices(self, request: web.Request) -> web.Response:
        self.metrics.requests.labels("voices", "ok").inc()
        return _json(voices.catalogue())

    def _bad(self, endpoint: str, exc: RequestError) -> web.Response:
        log.warning("bad request", extra=kv(endpoint=endpoint, param=exc.param, reason=exc.reason))
        self.metrics.requests.labels(endpoint, "bad_request").inc()
        return _json(exc.body(), status=400)

    # --- TTS ---

    async def speech(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            job = core.decode_speech(await request.read(), self.limits.max_input_chars)
        except RequestError as exc:
            return self._bad("speech", exc)
        engine = job.voice.engine
        try:
            if job.response_format == "pcm":
                resp, samples, compute = await self._stream_pcm(request, job, started)
            else:
                body, samples, compute = await self.run(self._synthesize_whole, job)
                self.metrics.first_audio.labels(engine).observe(time.perf_counter() - started)
                resp = web.Response(body=body, content_type=job.content_type)
        except _Cut as cut:
            if cut.outcome == "aborted":
                log.info("client went away mid-speech", extra=kv(voice=job.voice.name))
            else:
                log.error("speech failed mid-stream", exc_info=cut.__cause__, extra=kv(voice=job.voice.name))
            self.metrics.requests.labels("speech", cut.outcome).inc()
            return cut.response
        except Exception as exc:  # an engine failure answers 500 and leaves the service serving
            log.exception("speech failed", extra=kv(voice=job.voice.name))
            self.metrics.requests.labels("speech", "error").inc()
            return _server_error(f"{engine} failed: {type(exc).__name__}")
        self._account(engine, samples / self.engines.native_rate(job.voice), compute)
        self.metrics.requests.labels("speech", "ok").inc()
        self.metrics.request_seconds.labels("speech").observe(time.perf_counter() - started)
        return resp

    def _synthesize_whole(self, job: core.SpeechJob) -> tuple[bytes, int, float]:
        t0 = time.perf_counter()
        pcm = b"".join(self.engines.synthesize(job.voice, job.text, job.speed))
        compute = time.perf_counter() - t0
        wire = audio.resample(pcm, self.engines.native_rate(job.voice))
        return audio.encode(wire, job.response_format), len(pcm) // 2, compute

    async def _stream_pcm(self, request: web.Request, job: core.SpeechJob,
                          started: float) -> tuple[web.StreamResponse, int, float]:
        chunks = self.engines.synthesize(job.voice, job.text, job.speed)
        resampler = audio.Resampler(self.engines.native_rate(job.voice))
        done = object()

        def step() -> tuple[Any, float]:
            t0 = time.perf_counter()
            pcm = next(chunks, done)
            return pcm, time.perf_counter() - t0

        resp: web.StreamResponse | None = None
        samples, compute = 0, 0.0
        while True:
            try:
                pcm, took = await self.run(step)
            except Exception as exc:
                if resp is None:
                    raise  # nothing sent yet: the handler answers 500
                raise _Cut(resp, "error") from exc
            compute += took
            if pcm is done:
                break
            assert isinstance(pcm, bytes)
            samples += len(pcm) // 2
            if resp is None:  # headers go with the first audio: an engine error before it is still a 500
                resp = web.StreamResponse(headers=_stream_headers(request, job.content_type))
                await resp.prepare(request)
                self.metrics.first_audio.labels(job.voice.engine).observe(time.perf_counter() - started)
            try:
                await resp.write(resampler.push(pcm))
            except ConnectionError:  # the client left: stop synthesising (the rest would go nowhere)
                raise _Cut(resp, "aborted") from None
        if resp is None:  # nothing to say (only punctuation): an empty body, still 200
            resp = web.StreamResponse(headers=_stream_headers(request, job.content_type))
            await resp.prepare(request)
        await resp.write(resampler.flush())
        await resp.write_eof()
        return resp, samples, compute

    def _account(self, engine: str, audio_s: float, compute_s: float) -> None:
        self.metrics.audio_seconds.labels(engine).inc(audio_s)
        self.metrics.compute_seconds.labels(engine).inc(compute_s)
        if audio_s > 0:
            self.metrics.rtf.labels(engine).observe(compute_s / audio_s)

    # --- STT ---

    async def transcriptions(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            job, data = await self._read_form(request)
            samples = await self.run(audio.decode_upload, data)
        except RequestError as exc:
            return self._bad("transcriptions", exc)
        try:
            (segments, duration), compute = await self.run(self._transcribe, samples, job)
        except Exception as exc:
            log.exception("transcription failed")
            self.metrics.requests.labels("transcriptions", "error").inc()
            return _server_error(f"whisper failed: {type(exc).__name__}")
        self._account("whisper", duration, compute)
        content_type, body = core.transcription_body(job, segments, duration)
        self.metrics.requests.labels("transcriptions", "ok").inc()
        self.metrics.request_seconds.labels("transcriptions").observe(time.perf_counter() - started)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    def _transcribe(self, samples: Any, job: core.TranscribeJob) -> tuple[Any, float]:
        t0 = time.perf_counter()
        result = self.engines.transcribe(samples, job.language, job.prompt, job.temperature)
        return result, time.perf_counter() - t0

    async def _read_form(self, request: web.Request) -> tuple[core.TranscribeJob, bytes]:
        if not request.content_type.startswith("multipart/"):
            raise RequestError("file", f"send multipart/form-data with the audio in 'file' (got "
                                       f"{request.content_type or 'no Content-Type'})")
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise RequestError("file", f"is larger than {self.limits.max_upload_mb:g} MB") from None
        except ValueError as exc:
            raise RequestError("file", f"unreadable multipart body: {exc}") from None
        fields: dict[str, list[str]] = {}
        data: bytes | None = None
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if name == "file":
                    data = value.file.read()
            else:
                fields.setdefault(name, []).append(str(value))
        job = core.decode_transcription(fields, data is not None)
        assert data is not None
        return job, data


@asynccontextmanager
async def serve_in_background(engines: Engines, host: str = "127.0.0.1", port: int = 0, *,
                              metrics: SpeechMetrics | None = None, limits: Limits = Limits(),
                              workers: int | None = None) -> AsyncIterator[str]:
    """Serve on ``host:port`` in this event loop; yield the base URL (ending in ``/v1``).

    ``port=0`` picks a free port; ``metrics`` defaults to a private registry.
    """
    server = SpeechServer(engines, metrics or SpeechMetrics(CollectorRegistry()), limits, workers)
    try:
        async with serve_app(server.app(), host, port) as url:
            yield url
    finally:
        server.close()
