"""The `crosstalk` console script against a real nats-server.

Batch events are synthetic (published on the real BATCH_EVENTS stream);
`batch start` talks to a tiny responder on `batch.start` standing in for the
dispatcher. Start tests use their own nats-server so that no dispatcher from
another test file answers them or later picks their commands up from the
BATCH_CMDS stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from support.servers import Server, free_port, start_nats

from shared import bus, subjects
from shared.contracts import (
    BatchAccepted,
    BatchFinished,
    BatchReply,
    BatchSpec,
    ConversationDispatched,
    ConversationJoined,
    ConversationSettled,
    StartBatch,
    decode,
    encode,
)

CROSSTALK = str(Path(sys.executable).parent / "crosstalk")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def cli_env(nats_url: str, data_dir: Path) -> dict[str, str]:
    return {**os.environ, "NATS_URL": nats_url, "CROSSTALK_DATA_DIR": str(data_dir), "COLUMNS": "200"}


async def crosstalk(*args: str, env: dict[str, str], timeout: float = 60) -> Run:
    proc = await asyncio.create_subprocess_exec(
        CROSSTALK, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def spec(batch_id: str, n: int) -> BatchSpec:
    return BatchSpec(batch_id=batch_id, conversations=n, concurrency=2, scenario="en-account-help",
                     language="en", max_turns=8, mode="text")


class Events:
    """Publishes a batch's lifecycle on the real stream, as the dispatcher would."""

    def __init__(self, js: JetStreamContext, batch_id: str, t0: float) -> None:
        self.js, self.batch_id, self.t0 = js, batch_id, t0
        self.subject = subjects.batch_events(batch_id)

    async def pub(self, event: object) -> None:
        await bus.publish(self.js, self.subject, event)

    async def accepted(self, n: int) -> None:
        await self.pub(BatchAccepted(spec=spec(self.batch_id, n), at=self.t0))

    async def dispatched(self, conv: str, attempt: int = 1, dt: float = 1) -> None:
        await self.pub(ConversationDispatched(batch_id=self.batch_id, conversation_id=conv, attempt=attempt,
                                              room=f"{self.batch_id}-{conv}-{attempt}", at=self.t0 + dt))
        await self.pub(ConversationJoined(batch_id=self.batch_id, conversation_id=conv, attempt=attempt,
                                          join_seconds=0.8, at=self.t0 + dt + 0.8))

    async def settled(self, conv: str, outcome: str, reason: str, *, attempt: int = 1, retry: bool = False,
                      dt: float = 10) -> None:
        await self.pub(ConversationSettled(batch_id=self.batch_id, conversation_id=conv, attempt=attempt,
                                           outcome=outcome, reason=reason, retry=retry, turns=6,  # type: ignore[arg-type]
                                           at=self.t0 + dt))

    async def finished(self, status: str, completed: int, failed: int, dt: float) -> None:
        await self.pub(BatchFinished(batch_id=self.batch_id, status=status,  # type: ignore[arg-type]
                                     requested=completed + failed, completed=completed, failed=failed,
                                     started_at=self.t0, finished_at=self.t0 + dt))


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    conn = await nats.connect(nats_url)
    yield await bus.jetstream(conn)
    await conn.drain()


# --------------------------------------------------------------------------- watch


async def test_watch_replays_a_finished_batch_and_fails_when_it_failed(
    js: JetStreamContext, nats_url: str, unique: str, tmp_path: Path
) -> None:
    bid = f"cli-replay-{unique}"
    ev = Events(js, bid, time.time() - 300)
    await ev.accepted(4)
    for i, conv in enumerate(("c0", "c1", "c2", "c3")):
        await ev.dispatched(conv, dt=1 + i)
    await ev.settled("c0", "completed", "end_conversation:support", dt=30)
    await ev.settled("c1", "failed", "join_timeout: no agent after 60s", retry=True, dt=61)
    await ev.dispatched("c1", attempt=2, dt=62)
    await ev.settled("c1", "failed", "join_timeout: no agent after 60s", attempt=2, dt=122)
    await ev.settled("c2", "failed", "agent_error: model 500", dt=40)
    await ev.settled("c3", "completed", "max_turns", dt=50)
    await ev.finished("failed", completed=2, failed=2, dt=120)

    run = await crosstalk("batch", "watch", bid, env=cli_env(nats_url, tmp_path))
    assert run.code == 1, run
    assert f"batch {bid} failed" in run.stdout
    assert "2 completed, 2 failed, of 4" in run.stdout
    assert "failures: agent_error 1, join_timeout 1" in run.stdout
    assert "wall time: 2m00s, 2.0 conv/min" in run.stdout
    assert f"results: {(tmp_path / 'batches' / bid).resolve()}/" in run.stdout
    # Not a terminal: plain status lines, no progress-bar control codes.
    assert f"batch {bid}: 4/4 settled (2 completed, 2 failed), 0 in flight" in run.stderr
    assert "\x1b[" not in run.stderr + run.stdout


async def test_watch_follows_a_running_batch_live(
    js: JetStreamContext, nats_url: str, unique: str, tmp_path: Path
) -> None:
    bid = f"cli-live-{unique}"
    ev = Events(js, bid, time.time())
    await ev.accepted(3)
    for conv in ("c0", "c1", "c2"):
        await ev.dispatched(conv)
    await ev.settled("c0", "completed", "max_turns")

    proc = await asyncio.create_subprocess_exec(
        CROSSTALK, "batch", "watch", bid, "--timeout", "60", env=cli_env(nats_url, tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None and proc.stdout is not None
    try:
        # The replay of what happened so far comes first, while the batch is still running.
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert f"batch {bid}: 1/3 settled (1 completed, 0 failed), 2 in flight" in line
        await ev.settled("c1", "completed", "end_conversation:customer", dt=20)
        await ev.settled("c2", "completed", "max_turns", dt=25)
        await ev.finished("completed", completed=3, failed=0, dt=30)
        out = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, out
    assert f"batch {bid} completed" in out
    assert "3 completed, 0 failed, of 3" in out
    assert "failures" not in out


async def test_watch_an_unknown_batch_gives_up_clearly(nats_url: str, unique: str, tmp_path: Path) -> None:
    run = await crosstalk("batch", "watch", f"cli-none-{unique}", "--wait", "1", env=cli_env(nats_url, tmp_path))
    assert run.code == 3, run
    assert f"no events for batch cli-none-{unique} within 1s" in run.stderr


async def test_unreachable_nats_is_reported_without_credentials(tmp_path: Path) -> None:
    url = f"nats://alice:s3cret@127.0.0.1:{free_port()}"
    run = await crosstalk("batch", "watch", "anything", "--wait", "1", env=cli_env(url, tmp_path))
    assert run.code == 3, run
    assert "cannot reach NATS" in run.stderr
    assert "s3cret" not in run.stderr + run.stdout and "alice" not in run.stderr


# --------------------------------------------------------------------------- start (own nats-server)


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_nats(tmp_path_factory.mktemp("cli-nats"))
    yield srv
    srv.stop()


class Responder:
    """Stands in for the dispatcher on `batch.start`: records requests, replies with a verdict."""

    def __init__(self, nc: Client, reply: BatchReply, after: object = None) -> None:
        self.nc, self.reply, self.after = nc, reply, after
        self.requests: list[StartBatch] = []
        self.raw: list[dict[str, object]] = []

    async def handle(self, msg: nats.aio.msg.Msg) -> None:
        self.raw.append(json.loads(msg.data))
        cmd = decode(msg.data, StartBatch)
        self.requests.append(cmd)
        reply = self.reply
        if reply.accepted and reply.batch_id is None:
            reply = BatchReply(accepted=True, batch_id=cmd.batch_id or "generated-1")
        await msg.respond(encode(reply))
        if self.after is not None:
            await self.after(reply.batch_id)  # type: ignore[operator]


@pytest.fixture
async def own_nc(own_nats: Server) -> AsyncIterator[Client]:
    conn = await nats.connect(own_nats.url)
    yield conn
    await conn.drain()


async def serve(nc: Client, responder: Responder) -> object:
    sub = await nc.subscribe(subjects.BATCH_START, cb=responder.handle)
    await nc.flush()
    return sub


async def test_start_sends_the_options_and_prints_the_verdict(
    own_nats: Server, own_nc: Client, unique: str, tmp_path: Path
) -> None:
    responder = Responder(own_nc, BatchReply(accepted=True))
    sub = await serve(own_nc, responder)
    bid = f"cli-start-{unique}"
    run = await crosstalk("batch", "start", "-n", "5", "-c", "2", "--scenario", "hi-account-help", "--language", "hi",
                          "--max-turns", "4", "--mode", "text", "--batch-id", bid, env=cli_env(own_nats.url, tmp_path))
    await sub.unsubscribe()  # type: ignore[attr-defined]
    assert run.code == 0, run
    assert f"batch {bid} accepted" in run.stdout
    assert f"crosstalk batch watch {bid}" in run.stdout
    assert responder.raw == [{"batch_id": bid, "conversations": 5, "concurrency": 2, "scenario": "hi-account-help",
                              "language": "hi", "max_turns": 4, "mode": "text"}]

    # No options: an empty command, every default left to the dispatcher; the reply names the generated id.
    responder.raw.clear()
    sub = await serve(own_nc, responder)
    run = await crosstalk("batch", "start", env=cli_env(own_nats.url, tmp_path))
    await sub.unsubscribe()  # type: ignore[attr-defined]
    assert run.code == 0, run
    assert responder.raw == [{}]
    assert "batch generated-1 accepted" in run.stdout


async def test_start_rejected_names_field_and_reason(
    own_nats: Server, own_nc: Client, tmp_path: Path
) -> None:
    verdict = BatchReply(accepted=False, field="scenario", reason="unknown scenario 'nope'")
    sub = await serve(own_nc, Responder(own_nc, verdict))
    run = await crosstalk("batch", "start", "--scenario", "nope", env=cli_env(own_nats.url, tmp_path))
    await sub.unsubscribe()  # type: ignore[attr-defined]
    assert run.code == 2, run
    assert "rejected: scenario: unknown scenario 'nope'" in run.stderr


async def test_start_duplicate_is_reported_as_such(own_nats: Server, own_nc: Client, tmp_path: Path) -> None:
    verdict = BatchReply(accepted=True, batch_id="same-id", duplicate=True)
    sub = await serve(own_nc, Responder(own_nc, verdict))
    run = await crosstalk("batch", "start", "--batch-id", "same-id", env=cli_env(own_nats.url, tmp_path))
    await sub.unsubscribe()  # type: ignore[attr-defined]
    assert run.code == 0, run
    assert "batch same-id already accepted" in run.stdout


async def test_start_follow_watches_until_the_batch_ends(
    own_nats: Server, own_nc: Client, unique: str, tmp_path: Path
) -> None:
    js = await bus.jetstream(own_nc)

    async def run_batch(batch_id: str) -> None:
        async def play() -> None:
            ev = Events(js, batch_id, time.time())
            await ev.accepted(2)
            await ev.dispatched("c0")
            await ev.dispatched("c1")
            await asyncio.sleep(0.3)
            await ev.settled("c0", "completed", "max_turns", dt=3)
            await ev.settled("c1", "completed", "end_conversation:support", dt=4)
            await ev.finished("completed", completed=2, failed=0, dt=6)

        asyncio.get_running_loop().create_task(play())

    bid = f"cli-follow-{unique}"
    sub = await serve(own_nc, Responder(own_nc, BatchReply(accepted=True), after=run_batch))
    run = await crosstalk("batch", "start", "-n", "2", "--batch-id", bid, "--follow",
                          env=cli_env(own_nats.url, tmp_path))
    await sub.unsubscribe()  # type: ignore[attr-defined]
    assert run.code == 0, run
    assert f"batch {bid} accepted" in run.stdout
    assert f"batch {bid} completed" in run.stdout
    assert "2 completed, 0 failed, of 2" in run.stdout
    assert f"results: {(tmp_path / 'batches' / bid).resolve()}/" in run.stdout


async def test_start_without_a_dispatcher_keeps_the_command(
    own_nats: Server, own_nc: Client, unique: str, tmp_path: Path
) -> None:
    bid = f"cli-queued-{unique}"
    run = await crosstalk("batch", "start", "--batch-id", bid, "--request-timeout", "1",
                          env=cli_env(own_nats.url, tmp_path))
    assert run.code == 3, run
    assert "no verdict from a dispatcher within 1s" in run.stderr
    # The command is in BATCH_CMDS, waiting for a dispatcher.
    js = own_nc.jetstream()
    stored = await js.get_last_msg("BATCH_CMDS", subjects.BATCH_START)
    assert json.loads(stored.data) == {"batch_id": bid}
