"""Session fixtures: one real nats-server (JetStream) and one real livekit-server per test run.

Both start on free ports in a temp dir and stop at the end. To use servers you
already run, set CROSSTALK_TEST_NATS_URL and/or CROSSTALK_TEST_LIVEKIT_URL
(with LIVEKIT_API_KEY/LIVEKIT_API_SECRET if not the dev keys).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from support.harness import Proc, Procs
from support.servers import Server, free_port, start_livekit, start_nats, start_webhook

from shared import streams


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crosstalk")


@pytest.fixture(scope="session")
def nats_server(workdir: Path) -> Iterator[Server]:
    url = os.environ.get("CROSSTALK_TEST_NATS_URL")
    if url:
        yield Server(None, url)
        return
    srv = start_nats(workdir / "nats")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: Server) -> str:
    return nats_server.url


@contextlib.contextmanager
def _audited_livekit(workdir: Path, nats_url: str) -> Iterator[Server]:
    """livekit-server posting its webhooks to crosstalk's receiver (services/webhook), which
    publishes them to ``nats_url``: what the sink's room audit is built from."""
    hook_port = free_port()
    srv = start_livekit(workdir / "livekit", webhook_url=f"http://127.0.0.1:{hook_port}/webhook")
    try:
        hook = start_webhook(workdir / "webhook", nats_url, hook_port)
    except BaseException:
        srv.stop()
        raise
    srv.extra["webhook"] = hook
    try:
        yield srv
    finally:
        hook.stop()
        srv.stop()


@pytest.fixture(scope="session")
def livekit_server(workdir: Path, nats_server: Server) -> Iterator[Server]:
    """The session's livekit-server, with webhooks into this session's NATS (or CROSSTALK_TEST_LIVEKIT_URL's)."""
    url = os.environ.get("CROSSTALK_TEST_LIVEKIT_URL")
    if url:
        yield Server(None, url)
        return
    with _audited_livekit(workdir, nats_server.url) as srv:
        yield srv


@pytest.fixture(scope="session")
def audited_livekit(livekit_server: Server, workdir: Path, nats_server: Server) -> Iterator[Server]:
    """A livekit-server whose webhooks reach this session's NATS: the session's own, or, when the
    tests reuse an external server (which posts its webhooks elsewhere), one started for the audit
    tests, so they always run."""
    if "webhook" in livekit_server.extra:
        yield livekit_server
        return
    with _audited_livekit(workdir / "audited", nats_server.url) as srv:
        yield srv


@pytest.fixture(scope="session")
def livekit_env(livekit_server: Server) -> dict[str, str]:
    return {
        "LIVEKIT_URL": livekit_server.url,
        "LIVEKIT_API_KEY": os.environ.get("LIVEKIT_API_KEY", "devkey"),
        "LIVEKIT_API_SECRET": os.environ.get("LIVEKIT_API_SECRET", "secret"),
    }


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[object]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.drain()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server of the test's own, for a service that must not see other tests' streams."""
    srv = start_nats(tmp_path / "nats")
    yield srv.url
    srv.stop()


@pytest.fixture
def procs(tmp_path: Path, fresh_nats: str, livekit_env: dict[str, str]) -> Iterator[Procs]:
    """Service processes on ``fresh_nats`` and the session's livekit-server, stopped after the test."""
    p = Procs(tmp_path, fresh_nats, livekit_env)
    yield p
    p.stop_all()
    print(p.logs())  # shown by pytest when the test failed


@pytest.fixture
async def bus_conn(fresh_nats: str) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    """A connection to ``fresh_nats`` and its JetStream, the streams created."""
    conn = await nats.connect(fresh_nats)
    js = conn.jetstream(timeout=10)
    await streams.ensure_streams(js)
    yield conn, js
    await conn.close()


@pytest.fixture(scope="session")
def speech_service(workdir: Path) -> Iterator[Proc]:
    """One real services/speech process for the session (its models load once, ~3 s): Piper, espeak-ng,
    faster-whisper. ``speech_service.info["url"]`` is its OpenAI base URL. Small limits, so the
    oversized-input tests stay small: 1000 input characters, 1 MB uploads."""
    p = Procs(workdir / "speech", "nats://127.0.0.1:1")  # the speech service uses no NATS
    (workdir / "speech").mkdir(exist_ok=True)
    proc = p.speech(CROSSTALK_SPEECH_MAX_INPUT_CHARS="1000", CROSSTALK_SPEECH_MAX_UPLOAD_MB="1")
    yield proc
    p.stop_all()
    print(p.logs())


@pytest.fixture(scope="session")
def speech_url(speech_service: Proc) -> str:
    return speech_service.info["url"]


@pytest.fixture
def unique() -> str:
    """A fresh id fragment so tests sharing one server never collide."""
    return uuid.uuid4().hex[:10]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the item, so fixtures can react to a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
