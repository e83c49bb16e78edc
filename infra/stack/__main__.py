"""``python -m infra.stack <command>``: what the justfile's stack recipes run."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from infra.stack.commands import down, logs, status, up
from infra.stack.config import Config, StackError
from infra.stack.demo import batch, check, demo


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stack", description="Bring the crosstalk stack up and down under supervisord.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start (or update) the stack and wait until healthy")
    sub.add_parser("down", help="stop everything this stack started")
    sub.add_parser("status", help="what runs, where, and whether it is healthy")
    lg = sub.add_parser("logs", help="tail the logs (all, or one program)")
    lg.add_argument("name", nargs="?")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--no-follow", action="store_true")
    sub.add_parser("check", help="JetStream round-trip and LiveKit room create/list against the stack")
    bt = sub.add_parser("batch", help="publish batch.start: batch [conversations] [concurrency] [key=value ...]")
    bt.add_argument("args", nargs="*")
    bt.add_argument("--follow", "-f", action="store_true", help="watch the batch until it finishes")
    sub.add_parser("demo", help="up, check, and run a batch on the defaults")
    ns = ap.parse_args(argv)
    try:
        cfg = Config.from_env()
        if ns.cmd == "up":
            up(cfg)
            return 0
        if ns.cmd == "down":
            return down(cfg)
        if ns.cmd == "status":
            return status(cfg)
        if ns.cmd == "logs":
            return logs(cfg, ns.name, ns.lines, not ns.no_follow)
        if ns.cmd == "check":
            return check(cfg)
        if ns.cmd == "batch":
            nums = [a for a in ns.args if "=" not in a]
            extra = [a for a in ns.args if "=" in a]
            if len(nums) > 2 or not all(a.isdigit() for a in nums):
                raise StackError("usage: just batch [conversations] [concurrency] [key=value ...]")
            ints = [int(a) for a in nums] + [None, None]
            return batch(cfg, ints[0], ints[1], extra, ns.follow)
        if ns.cmd == "demo":
            return demo(cfg)
    except StackError as exc:
        print(f"crosstalk: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
