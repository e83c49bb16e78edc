"""Using a running stack: the smoke ``check``, ``batch`` through the CLI's own code, and ``demo``."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import msgspec
import nats
from nats.js.api import StorageType, StreamConfig

from infra.stack.commands import up
from infra.stack.config import Config, StackError
from shared import natsauth
from shared.contracts import ContractError, StartBatch


async def _check(cfg: Config) -> None:
    from livekit import api

    key = uuid.uuid4().hex[:10]
    nc = await nats.connect(cfg.nats_url, connect_timeout=5, max_reconnect_attempts=0,
                            **natsauth.from_env(service=natsauth.OPERATOR).connect_options())  # it creates a stream
    try:
        js = nc.jetstream(timeout=10)
        stream = f"CROSSTALK_SMOKE_{key}"
        await js.add_stream(StreamConfig(name=stream, subjects=[f"smoke.{key}"], storage=StorageType.MEMORY))
        try:
            body = "नमस्ते crosstalk".encode()
            ack = await js.publish(f"smoke.{key}", body)
            got = await js.get_msg(stream, ack.seq)
            if got.data != body:
                raise StackError("JetStream round-trip returned different bytes")
        finally:
            await js.delete_stream(stream)
    finally:
        await nc.close()
    print(f"  ok  JetStream: stream created, message round-tripped on {cfg.nats_url}")
    http_url = cfg.livekit_url.replace("ws", "http", 1)
    lk = api.LiveKitAPI(http_url, cfg.livekit_key, cfg.settings.livekit_api_secret)
    try:
        room = f"smoke-{key}"
        await lk.room.create_room(api.CreateRoomRequest(name=room, empty_timeout=60))
        listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
        await lk.room.delete_room(api.DeleteRoomRequest(room=room))
        if [r.name for r in listed.rooms] != [room]:
            raise StackError(f"LiveKit did not list the room it created ({room})")
    finally:
        await lk.aclose()
    print(f"  ok  LiveKit: room created, listed and deleted on {cfg.livekit_url}")


def check(cfg: Config) -> int:
    # PyJWT warns that the dev secret is short; that is the point of dev keys, not news.
    warnings.filterwarnings("ignore", message="The HMAC key is")
    try:
        asyncio.run(_check(cfg))
    except StackError:
        raise
    except Exception as exc:  # one line, not a traceback: this is a health verdict
        raise StackError(f"health check failed: {type(exc).__name__}: {exc}") from None
    return 0


def start_batch_fields(conversations: int | None, concurrency: int | None, extra: Sequence[str]) -> dict[str, Any]:
    """The batch.start fields from `just batch N C key=value ...`, validated against StartBatch."""
    body: dict[str, Any] = {}
    if conversations is not None:
        body["conversations"] = conversations
    if concurrency is not None:
        body["concurrency"] = concurrency
    for item in extra:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise StackError(f"batch option {item!r}: expected key=value (e.g. scenario=hi-account-help)")
        body[k] = v
    unknown = sorted(set(body) - set(StartBatch.__struct_fields__))
    if unknown:
        raise StackError(f"batch.start: unknown field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(StartBatch.__struct_fields__)})")
    try:  # strict=False: "10" from the command line is the integer 10
        cmd = msgspec.convert(body, StartBatch, strict=False)
    except msgspec.ValidationError as exc:
        raise StackError(f"batch.start: {exc}") from None
    return {k: getattr(cmd, k) for k in body}


def batch(cfg: Config, conversations: int | None, concurrency: int | None, extra: Sequence[str],
          follow: bool) -> int:
    """Send batch.start to this stack with the `crosstalk` CLI's own code (``cli.app.send_start``)."""
    import typer

    from cli.app import send_start, start_body

    try:
        body = start_body(**start_batch_fields(conversations, concurrency, extra))
    except ContractError as exc:
        raise StackError(f"batch.start: {exc}") from None
    settings = dataclasses.replace(cfg.settings, nats_url=cfg.nats_url, data_dir=cfg.data_dir)
    try:
        send_start(settings, body, follow=follow)
    except typer.Exit as exc:
        return int(exc.exit_code)
    return 0


def verdict(cfg: Config, batch_id: str, wait_s: float = 120.0) -> None:
    """The batch's verdict once the judge service has judged it: a short table and the report's path."""
    import time

    from rich.console import Console

    from cli import compare, report
    from cli.testcmd import verdict_table
    from services.judge.store import BatchFiles

    files = BatchFiles(cfg.data_dir, batch_id)
    deadline = time.monotonic() + wait_s
    while files.judged() is None:
        if time.monotonic() > deadline:
            print(f"the judge has not judged {batch_id} after {wait_s:g}s (`./ct logs judge`)")
            return
        time.sleep(0.5)
    paths = report.write(files)
    data = report.build(files)
    Console(highlight=False).print(verdict_table(data, compare.compare(None, data, compare.Thresholds())))
    if data["totals"]["not_judged"]:
        print("inconclusive = the deterministic checks passed, but no LLM judge is configured for the "
              "agent_expectations (set CROSSTALK_JUDGE_URL or OPENAI_API_KEY): never counted as a pass")
    print(f"report: {paths['html']}")


def demo(cfg: Config) -> int:
    up(cfg)
    print("proving it healthy:")
    check(cfg)
    n = int(os.environ.get("CROSSTALK_DEMO_CONVERSATIONS", "10"))
    batch_id = f"demo-{uuid.uuid4().hex[:8]}"
    print(f"running a batch of {n} conversations on the embedded defaults:")
    rc = batch(cfg, n, min(n, 5), [f"batch_id={batch_id}"], follow=True)
    if rc in (0, 1):
        verdict(cfg, batch_id)
    print("the stack keeps running: `./ct status`, `./ct batch 20 10`, `./ct down` "
          "(test your own agent: `.venv/bin/crosstalk test -h`)")
    return rc
