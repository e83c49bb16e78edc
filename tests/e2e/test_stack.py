"""`just up` / `just down` bring the real stack up and take all of it down again.

Each test runs its own stack on free ports in a temp dir (tests/e2e/stack.py),
so it never meets a developer's `just up` or another test's servers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import nats
import openai
import psutil
import pytest
from e2e.stack import ROOT, Stack
from livekit import api
from nats.js.api import ConsumerConfig, StreamConfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    """The failure says what is wrong in one `crosstalk: ...` line, never a traceback."""
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("crosstalk: ")
    return lines[0]


async def test_up_is_healthy_idempotent_and_down_leaves_nothing(tmp_path: Path, unique: str) -> None:
    stack = Stack.create(tmp_path)
    try:
        res = stack.up()
        assert stack.nats_url in res.stdout and stack.livekit_url in res.stdout
        assert str(stack.data_dir) in res.stdout
        assert "secret" not in res.stdout  # the (dev) secret is never printed
        pids = stack.pids()
        assert {"nats", "livekit"} <= set(pids)
        assert (stack.run_dir / "nats" / "jetstream").is_dir()  # JetStream store under the run dir

        # NATS with JetStream: a stream is created and a message round-trips through a durable consumer.
        nc = await nats.connect(stack.nats_url)
        try:
            js = nc.jetstream(timeout=10)
            await js.add_stream(StreamConfig(name=f"STACK_{unique}", subjects=[f"stack.{unique}.>"]))
            body = "ग्राहक: नमस्ते, my order is late".encode()
            ack = await js.publish(f"stack.{unique}.hello", body)
            assert ack.stream == f"STACK_{unique}" and ack.seq == 1
            sub = await js.pull_subscribe(f"stack.{unique}.>", durable=f"d-{unique}",
                                          config=ConsumerConfig(ack_wait=30))
            [msg] = await sub.fetch(1, timeout=10)
            assert msg.data == body and msg.subject == f"stack.{unique}.hello"
            await msg.ack_sync()
        finally:
            await nc.close()

        # livekit-server answers livekit-api with the dev keys: a room is created and listed.
        lk = api.LiveKitAPI(stack.livekit_url.replace("ws", "http", 1), "devkey", "secret")
        try:
            room = await lk.room.create_room(api.CreateRoomRequest(name=f"stack-{unique}", empty_timeout=60))
            assert room.name == f"stack-{unique}"
            listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[f"stack-{unique}"]))
            assert [r.name for r in listed.rooms] == [f"stack-{unique}"]
            await lk.room.delete_room(api.DeleteRoomRequest(room=f"stack-{unique}"))
        finally:
            await lk.aclose()

        # `just status` and `just check` agree it is healthy.
        status = stack.just("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "nats" in status.stdout and "livekit" in status.stdout and "BAD" not in status.stdout
        check = stack.just("check")
        assert check.returncode == 0, check.stdout + check.stderr

        # The offline speech service runs with its models loaded: it speaks and lists its voices.
        assert "speech" in pids
        speech = openai.AsyncOpenAI(base_url=stack.speech_url, api_key="crosstalk-offline", max_retries=0)
        audio = await speech.audio.speech.create(model="tts-1", voice="hi-espeak", input="नमस्ते",  # type: ignore[arg-type]
                                                 response_format="wav")
        assert audio.content[:4] == b"RIFF" and len(audio.content) > 10_000
        assert "en-joe" in [v["id"] for v in (await speech.get("/audio/voices", cast_to=dict))["data"]]

        # Every crosstalk process got its environment: a batch runs through `just batch` to transcripts on disk.
        batch = stack.just("batch", "2", "2", "--follow")
        assert batch.returncode == 0, batch.stdout + batch.stderr
        [folder] = (stack.data_dir / "batches").iterdir()
        deadline = time.monotonic() + 60  # the sink writes batch.json from the same events, a moment later
        while (summary := json.loads((folder / "batch.json").read_text()))["status"] == "running":
            assert time.monotonic() < deadline, summary
            await asyncio.sleep(0.2)
        assert (summary["status"], summary["requested"], summary["completed"]) == ("completed", 2, 2)
        assert len(list((folder / "conversations").glob("*.jsonl"))) == 2

        logs = stack.just("logs", "nats", "--no-follow", "-n", "5")
        assert logs.returncode == 0 and logs.stdout.strip()
        assert "nosuch" in one_line_error(stack.just("logs", "nosuch", "--no-follow"))

        # A second `just up` is harmless: same supervisord, nothing restarted.
        again = stack.just("up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert stack.pids() == pids

        # `just down` stops all of it: no process of ours, every port free.
        procs = {pid: psutil.Process(pid) for pid in pids.values()}
        down = stack.just("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert stack.processes() == []
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs.values())
        busy = [p for p in stack.ports() if not _free(p)]
        assert busy == []
        assert not (stack.run_dir / "supervisor.sock").exists()

        # and `just down` again says so without failing.
        again_down = stack.just("down")
        assert again_down.returncode == 0 and "not running" in again_down.stdout
    finally:
        stack.cleanup()
    assert stack.processes() == []


async def test_external_livekit_is_used_not_started(tmp_path: Path, livekit_env: dict[str, str]) -> None:
    stack = Stack.create(tmp_path, LIVEKIT_URL=livekit_env["LIVEKIT_URL"], CROSSTALK_SERVICES="nats,livekit")
    try:
        res = stack.up()
        assert "external" in res.stdout and livekit_env["LIVEKIT_URL"] in res.stdout
        assert set(stack.pids()) == {"supervisord", "nats"}
        assert _free(int(stack.env["CROSSTALK_LIVEKIT_PORT"]))
        assert stack.just("down").returncode == 0
    finally:
        stack.cleanup()
    assert stack.processes() == []


def test_up_again_adds_what_is_new_and_keeps_what_runs(tmp_path: Path) -> None:
    stack = Stack.create(tmp_path, CROSSTALK_SERVICES="nats")
    try:
        stack.up()
        first = stack.pids()
        assert set(first) == {"supervisord", "nats"}
        stack.env["CROSSTALK_SERVICES"] = "nats,livekit"  # a piece lands between two `just up`
        res = stack.up()
        assert "livekit" in res.stdout
        second = stack.pids()
        assert second["supervisord"] == first["supervisord"] and second["nats"] == first["nats"]
        assert "livekit" in second
        assert stack.just("down").returncode == 0
        assert _free(int(stack.env["CROSSTALK_LIVEKIT_PORT"])) and _free(int(stack.env["CROSSTALK_NATS_PORT"]))
    finally:
        stack.cleanup()
    assert stack.processes() == []


def test_bad_settings_fail_with_one_line_and_start_nothing(tmp_path: Path) -> None:
    stack = Stack.create(tmp_path, CROSSTALK_NATS_PORT="42x")
    line = one_line_error(stack.just("up"))
    assert "CROSSTALK_NATS_PORT" in line and "42x" in line

    stack = Stack.create(tmp_path, CROSSTALK_LIVEKIT_SERVER_BIN=str(tmp_path / "no-such-livekit-server"))
    line = one_line_error(stack.just("up"))
    assert "livekit-server" in line and "LIVEKIT_URL" in line

    stack = Stack.create(tmp_path, CROSSTALK_SERVICES="nats,rabbitmq")
    assert "rabbitmq" in one_line_error(stack.just("up"))

    stack = Stack.create(tmp_path, NATS_URL="nats://127.0.0.1:1")
    assert "NATS_URL" in one_line_error(stack.just("up"))

    stack = Stack.create(tmp_path, CROSSTALK_SERVICES="nats")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(stack.env["CROSSTALK_NATS_PORT"])))
        taken.listen()
        line = one_line_error(stack.just("up"))
    assert stack.env["CROSSTALK_NATS_PORT"] in line and "CROSSTALK_NATS_PORT" in line
    assert stack.processes() == []


def test_batch_command_is_validated_before_it_is_sent(tmp_path: Path) -> None:
    stack = Stack.create(tmp_path)
    assert "colour" in one_line_error(stack.just("batch", "10", "5", "colour=blue"))
    assert "conversations" in one_line_error(stack.just("batch", "0"))
    assert "mode" in one_line_error(stack.just("batch", "3", "mode=smoke-signals"))


def test_install_tools_without_go_says_what_to_do(tmp_path: Path) -> None:
    """No Go and no livekit-server: one line naming what is missing and how to supply it."""
    (tmp_path / "infra").mkdir()
    shutil.copy(ROOT / "infra" / "install-tools.sh", tmp_path / "infra" / "install-tools.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "mkdir", "grep", "mktemp", "rm", "mv", "cat"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    res = subprocess.run(["bash", str(tmp_path / "infra" / "install-tools.sh")], capture_output=True, text=True,
                         env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60)
    line = one_line_error(res)
    assert "Go" in line and "livekit-server" in line and "LIVEKIT_URL" in line


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
