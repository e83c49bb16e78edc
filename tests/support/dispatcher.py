"""The dispatcher's pure core under test: the settings and the batch spec its unit tests start from."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from shared.config import Settings
from shared.contracts import BatchSpec
from shared.scenarios import DEFAULT_SCENARIO

# deadlines short enough to cross with a few ticks of a fake clock
BASE = Settings(max_conversations=1000, join_deadline_s=10.0, conversation_timeout_s=100.0, max_attempts=3)


def settings(**overrides: Any) -> Settings:
    """:data:`BASE` with ``overrides`` (``max_concurrency=20``, ...)."""
    return replace(BASE, **overrides)


def spec(n: int = 3, concurrency: int = 2, bid: str = "b1") -> BatchSpec:
    """A text batch of ``n`` conversations of the default scenario."""
    return BatchSpec(batch_id=bid, conversations=n, concurrency=concurrency, scenario=DEFAULT_SCENARIO,
                     language="en", max_turns=8, mode="text")
