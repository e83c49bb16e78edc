"""One supervisord program of a stack: what it runs, where a user connects, how its health is seen."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Program:
    name: str
    argv: tuple[str, ...]
    where: str  # what a user connects to (never a secret)
    health: str | None  # URL that answers 2xx when healthy (None: RUNNING is enough)
    ports: tuple[int, ...]  # TCP ports it listens on
    env: dict[str, str] = field(default_factory=dict)
    priority: int = 50
    startsecs: int = 2
    stopwaitsecs: int = 15
