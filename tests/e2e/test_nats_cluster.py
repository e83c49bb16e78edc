"""The NATS cluster profile: `just up` with CROSSTALK_NATS_NODES=3 runs a 3-node JetStream cluster on
loopback, every stream R3; a batch runs while one node (the CONVERSATIONS stream's leader, the one
every turn goes through) is SIGKILLed mid-batch and restarted by supervisord, and loses nothing:
every conversation completes, every transcript holds each turn once, in order, and the stream's
replicas are all current again afterwards (nats-server's own view).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import nats
import pytest
from stack import stack_fixture
from support.harness import batch_events

from shared import streams, subjects
from shared.contracts import BatchFinished

pytestmark = pytest.mark.e2e


stack = stack_fixture("natscluster", CROSSTALK_NATS_NODES="3", CROSSTALK_WORKERS="2")


async def connect(stack: Any) -> Any:
    return await nats.connect(stack.nats_url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5)


async def test_streams_are_r3_and_a_batch_survives_a_node_killed_mid_batch(stack: Any) -> None:
    nc = await connect(stack)
    js = nc.jetstream(timeout=10)
    for cfg in streams.ALL_STREAMS:
        info = await js.stream_info(cfg.name)
        assert info.config.num_replicas == 3, (cfg.name, info.config.num_replicas)
        assert info.cluster is not None and info.cluster.leader and len(info.cluster.replicas or []) == 2, info.cluster
    leader = (await js.stream_info("CONVERSATIONS")).cluster.leader  # crosstalk-<n>
    program = "nats" if leader == "crosstalk-1" else f"nats-{leader.rsplit('-', 1)[1]}"

    body = {"batch_id": "cluster-1", "conversations": 8, "concurrency": 4, "max_turns": 6}
    reply = json.loads((await nc.request(subjects.BATCH_START, json.dumps(body).encode(), timeout=30)).data)
    assert reply["accepted"], reply
    conv_dir = stack.data_dir / "batches" / "cluster-1" / "conversations"

    def stored() -> int:
        return sum(p.read_bytes().count(b"\n") for p in conv_dir.glob("*.jsonl")) if conv_dir.is_dir() else 0

    deadline = time.monotonic() + 120
    while stored() < 8 and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    assert stored() >= 8, "no turn stored: the batch never started"
    pid = stack.pids()[program]
    os.kill(pid, signal.SIGKILL)  # the leader of the stream every turn is published to

    finished = None
    deadline = time.monotonic() + 300
    while finished is None and time.monotonic() < deadline:
        try:
            finished = next((e for e in await batch_events(js, "cluster-1") if isinstance(e, BatchFinished)), None)
        except Exception:  # the cluster electing a new leader
            pass
        await asyncio.sleep(1)
    assert finished is not None, "the batch did not finish after a node was killed"
    assert (finished.completed, finished.failed) == (8, 0), finished
    assert stack.pids()[program] != pid  # supervisord restarted the node

    files = sorted(conv_dir.glob("*.jsonl"))
    assert len(files) == 8
    for path in files:
        turns = [json.loads(x)["turn"] for x in path.read_bytes().splitlines()]
        assert turns == list(range(len(turns))) and len(turns) >= 2, (path.name, turns)

    async def all_current() -> bool:
        for cfg in streams.ALL_STREAMS:
            c = (await js.stream_info(cfg.name)).cluster
            if c is None or not c.leader or len(c.replicas or []) != 2 or not all(r.current for r in c.replicas):
                return False
        return True

    deadline = time.monotonic() + 120
    while not await all_current():
        assert time.monotonic() < deadline, "the restarted node's replicas never caught up"
        await asyncio.sleep(1)
    await nc.drain()
