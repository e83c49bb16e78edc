"""The faults of the chaos suite (benchmarks/chaos.py) and how each is injected into a running stack."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
from e2e.stack import Stack

KILLED = ("worker", "allocator", "dispatcher", "sink", "model")
FAULTS = (*(f"kill-{n}" for n in KILLED), "stop-livekit", "restart-nats", "fill-data")
CLUSTER_FAULTS = ("kill-nats-leader",)  # with --nats-nodes 3: SIGKILL the CONVERSATIONS stream's leader node
LIVEKIT_FAULTS = ("kill-livekit-node",)  # with --livekit-nodes 2: SIGKILL livekit-server node 2 (it hosts rooms)
JOIN_DEADLINE_S = 20.0


def fill(data_dir: Path, hold_s: float) -> dict[str, Any]:
    """Fill the data dir's filesystem until ENOSPC (down to single bytes), hold it full, free it."""
    filler = data_dir / ".chaos-fill"
    written = 0
    try:
        try:
            with open(filler, "wb", buffering=0) as fh:
                for size in (1 << 20, 4096, 64, 1):
                    chunk = b"\0" * size
                    while True:
                        try:
                            written += fh.write(chunk) or 0
                        except OSError:
                            break
        except OSError:
            pass
        st = os.statvfs(data_dir)
        free = st.f_bavail * st.f_frsize
        time.sleep(hold_s)
        return {"filled_bytes": written, "free_bytes_while_full": free, "held_full_s": hold_s}
    finally:
        filler.unlink(missing_ok=True)


def inject(stack: Stack, fault: str) -> dict[str, Any]:
    """Inject one fault; returns when the fault is over (the process killed, the server resumed...)."""
    pids = stack.pids()
    if fault == "kill-nats-leader":
        async def leader() -> str:
            nc = await nats.connect(stack.nats_url.split(","))
            try:
                info = await nc.jetstream().stream_info("CONVERSATIONS")
                return str(info.cluster.leader) if info.cluster else ""
            finally:
                await nc.close()

        node = asyncio.run(leader())  # crosstalk-<n>, the node every turn is published through
        name = "nats" if node == "crosstalk-1" else f"nats-{node.rsplit('-', 1)[-1]}"
        os.kill(pids[name], signal.SIGKILL)
        return {"program": name, "signal": "SIGKILL", "pid": pids[name], "role": "CONVERSATIONS stream leader"}
    if fault == "kill-livekit-node":
        port = stack.env["CROSSTALK_LIVEKIT_2_METRICS_PORT"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        node = re.search(r'node_id="([^"]+)"', text)
        os.kill(pids["livekit-2"], signal.SIGKILL)
        return {"program": "livekit-2", "signal": "SIGKILL", "pid": pids["livekit-2"],
                "node_id": node.group(1) if node else None}
    if fault.startswith("kill-"):
        name = fault.removeprefix("kill-")
        os.kill(pids[name], signal.SIGKILL)
        return {"program": name, "signal": "SIGKILL", "pid": pids[name]}
    if fault == "stop-livekit":
        hold = JOIN_DEADLINE_S + 10
        os.kill(pids["livekit"], signal.SIGSTOP)
        try:
            time.sleep(hold)
        finally:
            os.kill(pids["livekit"], signal.SIGCONT)
        return {"program": "livekit", "signal": "SIGSTOP then SIGCONT", "stopped_s": hold,
                "join_deadline_s": JOIN_DEADLINE_S}
    if fault == "restart-nats":
        from infra.stack import supervisor

        server = supervisor.rpc(stack.config()).supervisor
        server.stopProcess("nats", True)
        time.sleep(2)
        server.startProcess("nats", True)
        return {"program": "nats", "how": "supervisord stop (SIGTERM), 2 s down, start"}
    if fault == "fill-data":
        return {"program": "sink", **fill(stack.data_dir, hold_s=20)}
    raise ValueError(f"unknown fault {fault!r}")


def unsettled_elsewhere(stack: Stack, batch_id: str, node_id: str) -> list[str]:
    """Participants never reported gone, in rooms livekit-server did not first place on ``node_id``
    (a killed node never sends its participant_left webhooks: those are expected, these are not).
    Placement from the nodes' own logs ("selected node for room")."""
    first: dict[str, str] = {}
    for log in sorted((stack.run_dir / "logs").glob("livekit*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "selected node for room" in line and batch_id in line:
                info = json.loads(line.split("selected node for room", 1)[1].strip())
                first.setdefault(info["room"], info["selectedNodeID"])
    doc = json.loads((stack.data_dir / "batches" / batch_id / "batch.json").read_bytes())
    return [f"{p['room']}/{p['identity']}" for c in doc["conversations"].values() for p in c.get("participants", [])
            if not p.get("left_at") and first.get(p["room"]) != node_id]
