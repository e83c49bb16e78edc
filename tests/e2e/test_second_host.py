"""A second machine, simulated: a network namespace of this test's own with its own address
(10.231.N.2, a veth pair to 10.231.N.1), where a second `just up` runs only a worker and an
allocator (CROSSTALK_SERVICES=worker,allocator) that reach NATS, livekit-server and the model over
10.231.N.1 only, as a real second host would. The first host's stack listens on 10.231.N.1
(CROSSTALK_HOST). A batch then uses both hosts: each host's worker runs conversations (its own log),
and nats-server's own connection list shows the second host's worker and allocator connected from
10.231.N.2. Needs root (ip netns), as the chaos suite does; the namespace is removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from stack import JUST, ROOT, Stack
from support.harness import batch_events

from shared import subjects
from shared.contracts import BatchFinished

pytestmark = pytest.mark.e2e


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Stack, str, str]]:
    tmp = tmp_path_factory.mktemp("twohosts")
    n = random.randint(1, 250)
    ns, veth = f"ct-host2-{n}", f"ct{n}"
    first, second = f"10.231.{n}.1", f"10.231.{n}.2"
    ip("netns", "add", ns)
    try:
        ip("link", "add", f"{veth}-h", "type", "veth", "peer", "name", f"{veth}-n")
        ip("link", "set", f"{veth}-n", "netns", ns)
        ip("addr", "add", f"{first}/24", "dev", f"{veth}-h")
        ip("link", "set", f"{veth}-h", "up")
        for args in (("addr", "add", f"{second}/24", "dev", f"{veth}-n"), ("link", "set", f"{veth}-n", "up"),
                     ("link", "set", "lo", "up")):
            ip("netns", "exec", ns, "ip", *args)
        # beyond loopback the stack refuses LiveKit's public default secret: both hosts share one of their own
        secret = secrets.token_urlsafe(32)
        host1 = Stack.create(tmp / "h1", CROSSTALK_HOST=first, CROSSTALK_WORKERS="1", LIVEKIT_API_SECRET=secret)
        cfg = host1.config()
        host2 = Stack.create(tmp / "h2", CROSSTALK_HOST=second, CROSSTALK_WORKERS="1", LIVEKIT_API_SECRET=secret,
                             CROSSTALK_SERVICES="worker,allocator", NATS_URL=cfg.nats_url,
                             LIVEKIT_URL=cfg.livekit_url, CROSSTALK_MODEL_URL=f"http://{first}:{cfg.model_port}/v1")
        try:
            host1.up()
            res = subprocess.run(["ip", "netns", "exec", ns, str(JUST), "up"], cwd=ROOT, env=host2.env,
                                 capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            assert res.returncode == 0, res.stdout + res.stderr
            time.sleep(3)
            yield host1, host2, first, second
        except BaseException:
            host1.dump_logs()
            host2.dump_logs()
            raise
        finally:
            subprocess.run(["ip", "netns", "exec", ns, str(JUST), "down"], cwd=ROOT, env=host2.env,
                           capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
            host2.cleanup()
            host1.cleanup()
    finally:
        subprocess.run(["ip", "link", "del", f"{veth}-h"], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def jobs(log: Path, batch_id: str) -> set[str]:
    return {json.loads(line)["room"] for line in log.read_text(errors="replace").splitlines()
            if '"ready announced"' in line and batch_id in line}


async def test_a_batch_uses_workers_on_both_hosts(hosts: Any) -> None:
    host1, host2, first, second = hosts
    mon = host1.env["CROSSTALK_NATS_MONITOR_PORT"]
    conns = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{mon}/connz", timeout=5).read())["connections"]
    remote = {c.get("name") for c in conns if c.get("ip") == second}
    assert "crosstalk-allocator" in remote and "worker-capacity" in remote, remote

    nc = await nats.connect(host1.nats_url)
    body = {"batch_id": "twohosts-1", "conversations": 8, "concurrency": 4, "max_turns": 6}
    reply = json.loads((await nc.request(subjects.BATCH_START, json.dumps(body).encode(), timeout=30)).data)
    assert reply["accepted"], reply
    finished = None
    deadline = time.monotonic() + 300
    while finished is None:
        assert time.monotonic() < deadline, "the batch did not finish"
        finished = next((e for e in await batch_events(nc.jetstream(), "twohosts-1") if isinstance(e, BatchFinished)),
                        None)
        await asyncio.sleep(0.5)
    await nc.drain()
    assert (finished.completed, finished.failed) == (8, 0), finished
    on1 = jobs(host1.run_dir / "logs" / "worker.log", "twohosts-1")
    on2 = jobs(host2.run_dir / "logs" / "worker.log", "twohosts-1")
    assert on1 and on2, (len(on1), len(on2))
    # the second host reached livekit-server over its own address: its jobs' room connections
    assert f"ws://{first}:" in (host2.run_dir / "logs" / "worker.log").read_text()
