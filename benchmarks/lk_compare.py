"""LiveKit's own agent load test, run on our livekit-server, as the yardstick for our join times.

    PYTHONPATH=.:tests python benchmarks/lk_compare.py [--rooms 50] [--duration S] [--variants silent,announce]

``run_lk_agent_load_test`` starts benchmarks/echo_agent.py (``python -m benchmarks.echo_agent``) under an agent name, runs
``lk perf agent-load-test`` (livekit-cli, see infra/install-lk.sh) against the given server
and returns lk's per-room join delays as quantiles. The ``__main__`` starts its own
livekit-server and prints one JSON report per echo-agent variant.

What lk measures, read from its source (pkg/loadtester/agentloadtester.go, v2.16.3):
- per room, one after the other: join as ``echo-participant``, publish an echo track,
  ``CreateDispatch(agent_name)``, then poll every 100 ms until an AGENT participant has
  appeared before starting the next room. Dispatches are therefore sequential, never a burst;
  ``--duration`` bounds the whole run, ramp included, so rooms not started by then are
  missing from its table (``rooms_started`` says how many were).
- join delay = the time from the CreateDispatch call returning to the Go SDK's
  ``OnParticipantConnected`` for the agent: what a client in the room sees, not when the
  agent's connect finished.
- livekit-server v1.13 announces a participant that publishes nothing only on a 3 s ticker
  per room (``subscriberUpdateInterval``), while an attribute change goes out at once; a
  silent connect-only agent therefore measures ~3 s whatever the dispatch cost. The
  ``announce`` variant sets one attribute after connecting, as an ``AgentSession`` does.
- lk joins rooms it never created: the server must have ``room.auto_create: true``
  (crosstalk's own config has it false; lk then fails every join with "not found", which
  LkFailed says). ``livekit-server --room.auto_create`` (or LIVEKIT_ROOM_AUTO_CREATE=true)
  overrides the YAML, so the stack's own server can take the flag for a benchmark run.

Measured here (2 cores, lk 2.16.3, livekit-server 1.13.5, 50 rooms): silent agent p50/p95/p99
2.98/2.99/3.01 s (all 50 on the ticker); announcing agent 0.40/0.81/0.88 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from support.servers import terminate

ROOT = Path(__file__).resolve().parents[1]
ECHO_AGENT = "benchmarks.echo_agent"  # run as a module from ROOT
INSTALL_HINT = "run infra/install-lk.sh (it says why when it cannot)"
AGENT_REGISTER_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0  # a stopped echo agent gets this long before SIGKILL

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_JOIN_FAILED = re.compile(r"Failed to join room (\S+) \(attempt (\d+)\): (.*)$")
_ROOM_FAILED = re.compile(r"Failed to (connect to|publish echo track to|dispatch agent to) room (\S+): (.*)$")
_NEVER = "0001-01-01T00:00:00Z"  # Go's zero time: lk never dispatched to that room


class LkUnavailable(RuntimeError):
    """The ``lk`` binary is not installed."""


class LkFailed(RuntimeError):
    """lk ran but measured nothing (every room failed, or its output could not be read)."""


class LkOutputError(ValueError):
    """A line of lk's output does not have the shape this parser knows; names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class LkRoom(msgspec.Struct, frozen=True):
    """One row of lk's "Test Statistics" table."""

    index: int
    room: str
    dispatched_at: str | None  # RFC 3339, None when lk never dispatched to the room
    agent_joined: bool
    join_delay_s: float | None
    agent_track_subscribed: bool
    echo_track_published: bool


class LkRoomFailure(msgspec.Struct, frozen=True):
    room: str
    step: str  # "join" (one attempt), "connect", "publish echo track", "dispatch agent"
    error: str


class LkOutput(msgspec.Struct, frozen=True):
    rooms: list[LkRoom]
    failures: list[LkRoomFailure]


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.Duration.String()``: ``2.98s``, ``342.27ms``, ``850µs``, ``1m2.5s``, ``-1ms``."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    if body == "0":
        return 0.0
    parts = _GO_DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise LkOutputError("Agent Join Delay", f"not a Go duration: {text!r}")
    return sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)


def _mark(text: str, field: str) -> bool:
    if text == "✓":
        return True
    if text == "✗":
        return False
    raise LkOutputError(field, f"expected ✓ or ✗, got {text!r}")


def parse_table(stdout: str) -> list[LkRoom]:
    """Rows of the table lk prints to stdout when the test ends (header and borders skipped)."""
    rows: list[LkRoom] = []
    header_seen = False
    for raw in stdout.splitlines():
        line = _ANSI.sub("", raw).strip()
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells and cells[0] == "#":
            header_seen = True
            continue
        if len(cells) != 7:
            raise LkOutputError("row", f"expected 7 cells, got {len(cells)}: {line!r}")
        index, room, dispatched, joined, delay, subscribed, published = cells
        if not index.isdigit():
            raise LkOutputError("#", f"not a row number: {index!r}")
        rows.append(LkRoom(
            index=int(index),
            room=room,
            dispatched_at=None if dispatched in ("", _NEVER) else dispatched,
            agent_joined=_mark(joined, "Agent Joined"),
            join_delay_s=None if delay == "-" else parse_go_duration(delay),
            agent_track_subscribed=_mark(subscribed, "Agent Track Subscribed"),
            echo_track_published=_mark(published, "Echo Track Published"),
        ))
    if rows and not header_seen:
        raise LkOutputError("table", "rows without the header row")
    return rows


def parse_failures(stderr: str) -> list[LkRoomFailure]:
    """The per-room errors lk logs on stderr (join retries, and the steps that gave up)."""
    out: list[LkRoomFailure] = []
    for raw in stderr.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if m := _JOIN_FAILED.search(line):
            out.append(LkRoomFailure(room=m.group(1), step="join", error=m.group(3)))
        elif m := _ROOM_FAILED.search(line):
            step = {"connect to": "connect", "publish echo track to": "publish echo track",
                    "dispatch agent to": "dispatch agent"}[m.group(1)]
            out.append(LkRoomFailure(room=m.group(2), step=step, error=m.group(3)))
    return out


def parse_output(stdout: str, stderr: str) -> LkOutput:
    return LkOutput(rooms=parse_table(stdout), failures=parse_failures(stderr))


def quantiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank quantiles, the same method as benchmarks/bench_batch.py uses for ours."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "min": None, "max": None, "mean": None, "n": 0}
    v = sorted(values)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(round(p * (len(v) - 1))))], 4)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "min": round(v[0], 4), "max": round(v[-1], 4),
            "mean": round(sum(v) / len(v), 4), "n": len(v)}


def summarize(out: LkOutput, rooms_requested: int) -> dict[str, Any]:
    """The comparison figures: join delay quantiles over the rooms whose agent joined, and counts."""
    delays = [r.join_delay_s for r in out.rooms if r.agent_joined and r.join_delay_s is not None]
    given_up = sorted({f.room for f in out.failures if f.step != "join"})
    return {
        "rooms": rooms_requested,
        "rooms_started": sum(1 for r in out.rooms if r.room),
        "rooms_dispatched": sum(1 for r in out.rooms if r.dispatched_at is not None),
        "agents_joined": sum(1 for r in out.rooms if r.agent_joined),
        "agent_tracks_subscribed": sum(1 for r in out.rooms if r.agent_track_subscribed),
        "echo_tracks_published": sum(1 for r in out.rooms if r.echo_track_published),
        "join_delay_s": quantiles(delays),
        # the server's 3 s participant-update ticker shows as delays near 3 s (see module doc)
        "joins_over_2_5_s": sum(1 for d in delays if d > 2.5),
        "rooms_failed": given_up,
        "join_retries": sum(1 for f in out.failures if f.step == "join"),
    }


def find_lk() -> str:
    for cand in (ROOT / ".tools" / "bin" / "lk", Path(sys.executable).parent / "lk"):
        if cand.exists():
            return str(cand)
    found = shutil.which("lk")
    if not found:
        raise LkUnavailable(f"lk (livekit-cli) not found: {INSTALL_HINT}")
    return found


def lk_version(lk: str) -> str:
    out = subprocess.run([lk, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return out.removeprefix("lk version ").strip() or "unknown"


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_echo_agent(livekit_url: str, api_key: str, api_secret: str, agent_name: str, *,
                     announce: bool, log_path: Path) -> subprocess.Popen[str]:
    """Start benchmarks/echo_agent.py and return once livekit-server has registered it."""
    env = {**os.environ, "LIVEKIT_URL": livekit_url, "LIVEKIT_API_KEY": api_key, "LIVEKIT_API_SECRET": api_secret}
    cmd = [sys.executable, "-m", ECHO_AGENT, "--agent-name", agent_name] + (["--announce"] if announce else [])
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    log.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + AGENT_REGISTER_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line and '"registered"' in line:
                return proc
        if proc.poll() is not None:
            raise LkFailed(f"echo agent exited with {proc.returncode} before registering: {_tail(log_path)}")
    terminate(proc, STOP_TIMEOUT_S)
    raise LkFailed(f"echo agent did not register with {livekit_url} in {AGENT_REGISTER_TIMEOUT_S:.0f}s: "
                   f"{_tail(log_path)}")


def default_duration_s(rooms: int) -> float:
    """Long enough for lk's sequential ramp when every join waits for the server's 3 s ticker."""
    return 3.5 * rooms + 15.0


def run_lk_agent_load_test(
    livekit_url: str,
    api_key: str,
    api_secret: str,
    rooms: int,
    duration_s: float | None,
    agent_name: str,
    *,
    announce: bool = True,
    start_agent: bool = True,
    lk: str | None = None,
) -> dict[str, Any]:
    """Run ``lk perf agent-load-test`` for ``rooms`` rooms and return its join delays.

    ``duration_s`` bounds lk's whole run, its sequential ramp included (None: long enough
    for the worst case, ``default_duration_s``). With ``start_agent`` an echo agent
    (benchmarks/echo_agent.py, ``announce`` as above) is started under ``agent_name`` for
    the run and stopped after it; otherwise one must already be registered under that name.
    The server needs ``room.auto_create: true``. Raises LkUnavailable without lk, LkFailed
    when no room could be measured; the API secret goes to lk through its environment only.
    """
    if rooms < 1:
        raise ValueError(f"rooms: must be >= 1, got {rooms}")
    if not agent_name.strip():
        raise ValueError("agent_name: must not be empty")
    duration = default_duration_s(rooms) if duration_s is None else float(duration_s)
    if duration <= 0:
        raise ValueError(f"duration_s: must be > 0, got {duration_s}")
    lk = lk or find_lk()
    version = lk_version(lk)
    with tempfile.TemporaryDirectory(prefix="lk-compare-") as tmp:
        agent = (start_echo_agent(livekit_url, api_key, api_secret, agent_name, announce=announce,
                                  log_path=Path(tmp) / "echo-agent.log") if start_agent else None)
        try:
            env = {**os.environ, "LIVEKIT_URL": livekit_url, "LIVEKIT_API_KEY": api_key,
                   "LIVEKIT_API_SECRET": api_secret}
            cmd = [lk, "perf", "agent-load-test", "--rooms", str(rooms), "--agent-name", agent_name,
                   "--duration", f"{duration:.0f}s"]
            t0 = time.monotonic()
            # cwd: a fresh dir, so no livekit.toml project file is picked up
            done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=duration + 120)
            wall = time.monotonic() - t0
        finally:
            if agent is not None:
                terminate(agent, STOP_TIMEOUT_S)
    if done.returncode != 0:
        raise LkFailed(f"lk exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    out = parse_output(done.stdout, done.stderr)
    result = {
        "tool": "lk perf agent-load-test",
        "lk_version": version,
        "agent": "benchmarks/echo_agent.py (thread executor)" + (" --announce" if announce else "")
        if start_agent else "external",
        "agent_name": agent_name,
        "announce": announce if start_agent else None,
        "duration_s": duration,
        "wall_s": round(wall, 2),
        "dispatch": "sequential (lk dispatches room i+1 once room i's agent is seen)",
        **summarize(out, rooms),
    }
    if result["agents_joined"] == 0:
        raise LkFailed(explain_no_joins(out, done.stderr))
    return result


def explain_no_joins(out: LkOutput, stderr: str) -> str:
    """Why lk measured nothing, in one line."""
    if any(f.error.strip() == "not found" for f in out.failures if f.step == "join"):
        return ("livekit-server answered 'not found' to lk's joins: it runs with room.auto_create: false "
                "and lk joins rooms it never created; use a server with auto_create: true")
    if not out.rooms:
        return f"lk printed no statistics table: {stderr.strip()[-500:]}"
    return f"no agent joined any of {len(out.rooms)} rooms (is an agent registered under that name?)"


def start_livekit_autocreate(workdir: Path) -> Any:
    """tests/support/servers.py's livekit-server with ``auto_create: true`` (lk needs it) and room for
    lk's ports: 2 participants x 2 peer connections a room, each its own UDP port."""
    from support.servers import Server, find_binary, free_port, livekit_config, wait_port

    port, tcp, prom = free_port(), free_port(), free_port()
    udp_start = 40000 + (os.getpid() * 7) % 20000
    cfg_text = livekit_config(port, tcp, udp_start, prom).replace("auto_create: false", "auto_create: true")
    cfg_text = cfg_text.replace(f"port_range_end: {udp_start + 100}", f"port_range_end: {udp_start + 1000}")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "livekit.yaml"
    cfg.write_text(cfg_text)
    log = open(workdir / "livekit.log", "wb")
    proc = subprocess.Popen([find_binary("livekit-server"), "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_port(port, proc=proc)
    return Server(proc, f"ws://127.0.0.1:{port}", {"prometheus_port": prom, "config": str(cfg)})


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rooms", type=int, default=50)
    ap.add_argument("--duration", type=float, default=None, help="seconds for each lk run (default: 3.5*rooms+15)")
    ap.add_argument("--variants", default="silent,announce", help="echo agent variants: silent, announce")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("silent", "announce")]
    if bad or not variants:
        ap.error(f"--variants: expected silent and/or announce, got {args.variants!r}")
    if args.rooms < 1:
        ap.error(f"--rooms: must be >= 1, got {args.rooms}")
    try:
        lk = find_lk()
    except LkUnavailable as exc:
        print(json.dumps({"lk_agent_load_test": None, "error": str(exc)}))
        return
    report: dict[str, Any] = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="lk-compare-server-") as tmp:
        server = start_livekit_autocreate(Path(tmp))
        try:
            for variant in variants:
                try:
                    run = run_lk_agent_load_test(server.url, "devkey", "secret", args.rooms, args.duration,
                                                 f"lk-echo-{variant}", announce=variant == "announce", lk=lk)
                except (LkFailed, subprocess.TimeoutExpired) as exc:
                    run = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}
                report["runs"].append({"variant": variant, **run})
        finally:
            server.stop()
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
