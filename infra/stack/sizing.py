"""How many worker processes this machine holds (``just up`` sizes them unless CROSSTALK_WORKERS says)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

# Measured on the 2-core, 24 GB machine (benchmarks/README.md, benchmarks/results/*.json): a worker
# process costs ~420-450 MB RSS idle (3.37 GB for 8, 5.89 GB for 14) and ~10-11 MB per agent session
# (thread executor); the whole stack spends 1.0-1.2 CPU-s per conversation (6 turns, scripted model),
# and a conversation lasts ~25 s of wall time when the machine is not saturated (200 @ 50: 115.7 s,
# i.e. ~29 s per slot including ~5 s of joining).
WORKER_PROCESS_MB = 450
WORKER_SESSION_MB = 11
CPU_S_PER_CONVERSATION = 1.1
CONVERSATION_WALL_S = 25.0
CPU_TARGET = 0.75  # leave a quarter of the cores for joins, nats, livekit-server and the services
STACK_RESERVE_MB = 1024  # nats-server, livekit-server, model, allocator, dispatcher, sink
MAX_WORKERS = 64


def size_workers(cores: float, available_mb: float, sessions_per_worker: int) -> tuple[int, str]:
    """How many worker processes this machine holds, and why (one line for `just up`/`status`).

    CPU: the conversations the cores sustain at ``CPU_TARGET`` (cores x target x wall s / CPU-s per
    conversation), two agent sessions each, in processes of ``sessions_per_worker``. Memory: what is
    available after the rest of the stack, per full worker process. The smaller, at least 1.
    """
    conversations = cores * CPU_TARGET * CONVERSATION_WALL_S / CPU_S_PER_CONVERSATION
    by_cpu = int(2 * conversations // sessions_per_worker)
    per_worker_mb = WORKER_PROCESS_MB + sessions_per_worker * WORKER_SESSION_MB
    by_mem = int(max(0.0, available_mb - STACK_RESERVE_MB) // per_worker_mb)
    n = max(1, min(by_cpu, by_mem, MAX_WORKERS))
    why = (f"{n} worker process{'es' if n != 1 else ''} x {sessions_per_worker} sessions = {n * sessions_per_worker} "
           f"agent sessions ({n * sessions_per_worker // 2} conversations at once), sized to this machine: "
           f"CPU {cores:g} cores hold {by_cpu} ({CPU_S_PER_CONVERSATION:g} CPU-s per ~{CONVERSATION_WALL_S:g} s "
           f"conversation at {CPU_TARGET:.0%}), memory {available_mb / 1024:.1f} GB available holds {by_mem} "
           f"({per_worker_mb} MB per full worker); CROSSTALK_WORKERS=N overrides")
    return n, why


def machine() -> tuple[float, float]:
    """(usable cores, available memory in MB), honouring CPU affinity and cgroup v2 limits."""
    cores: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    avail = psutil.virtual_memory().available / 2**20
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, (int(limit) - used) / 2**20)
    except (OSError, ValueError):
        pass
    return cores, avail


def choose(workers_raw: str, sessions: int) -> tuple[int, str]:
    """CROSSTALK_WORKERS (already validated) if set, else sized to this machine; and the line that says why."""
    if workers_raw:
        n = int(workers_raw)
        return n, f"{n} worker process{'es' if n != 1 else ''} x {sessions} sessions (CROSSTALK_WORKERS={n})"
    return size_workers(*machine(), sessions)
