"""The two-node LiveKit profile: `just up` with CROSSTALK_LIVEKIT_NODES=2 runs two livekit-server
nodes sharing a Redis (LiveKit's multi-node mode), the first worker registered with node 1 and the
second with node 2. A batch spreads its rooms over both nodes, as each node itself reports them
(its own ``livekit_room_total`` on its own /metrics, sampled while the batch runs, and the rooms its
own log says it was selected for), and completes with the room audit clean.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from typing import Any

import nats
import pytest
from stack import stack_fixture
from support.harness import batch_events

from shared import subjects
from shared.contracts import BatchFinished, ConversationSettled

pytestmark = pytest.mark.e2e


stack = stack_fixture("lknodes", CROSSTALK_LIVEKIT_NODES="2", CROSSTALK_WORKERS="2")


def node_rooms(port: str) -> tuple[str, float]:
    """(node id, rooms on that node) from the node's own /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r'^livekit_room_total\{node_id="([^"]+)"[^}]*\} (\S+)$', text, re.M)
    assert m, f"no livekit_room_total on :{port}"
    return m.group(1), float(m.group(2))


async def test_a_batch_spreads_its_rooms_over_both_livekit_nodes(stack: Any) -> None:
    ports = [stack.env["CROSSTALK_LIVEKIT_METRICS_PORT"], stack.env["CROSSTALK_LIVEKIT_2_METRICS_PORT"]]
    ids = [node_rooms(p)[0] for p in ports]
    assert ids[0] != ids[1], "two distinct nodes"
    logs = stack.run_dir / "logs"
    for log, port in (("worker.log", stack.env["CROSSTALK_LIVEKIT_PORT"]),
                      ("worker-2.log", stack.env["CROSSTALK_LIVEKIT_2_PORT"])):
        assert f":{port}" in (logs / log).read_text(), f"{log} not registered with its node (:{port})"

    nc = await nats.connect(stack.nats_url)
    body = {"batch_id": "lknodes-1", "conversations": 10, "concurrency": 5, "max_turns": 6}
    reply = json.loads((await nc.request(subjects.BATCH_START, json.dumps(body).encode(), timeout=30)).data)
    assert reply["accepted"], reply
    peak = [0.0, 0.0]
    finished = None
    deadline = time.monotonic() + 300
    while finished is None and time.monotonic() < deadline:
        for i, port in enumerate(ports):
            peak[i] = max(peak[i], node_rooms(port)[1])
        evs = await batch_events(nc.jetstream(), "lknodes-1")
        finished = next((e for e in evs if isinstance(e, BatchFinished)), None)
        await asyncio.sleep(0.3)
    await nc.drain()
    assert finished is not None and (finished.completed, finished.failed) == (10, 0), finished
    assert all(s.outcome == "completed" for s in evs if isinstance(s, ConversationSettled) and not s.retry)
    assert peak[0] >= 1 and peak[1] >= 1, f"rooms at once per node (each node's own metrics): {peak}"

    selected: dict[str, set[str]] = {ids[0]: set(), ids[1]: set()}
    for log in ("livekit.log", "livekit-2.log"):
        for line in (logs / log).read_text(errors="replace").splitlines():
            if "selected node for room" in line and "lknodes-1" in line:
                info = json.loads(line.split("selected node for room", 1)[1].strip())
                selected.setdefault(info["selectedNodeID"], set()).add(info["room"])
    assert all(selected[i] for i in ids), {k: len(v) for k, v in selected.items()}
    assert sum(len(selected[i]) for i in ids) == len(set().union(*selected.values())) >= 10
