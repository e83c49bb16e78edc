"""Fixtures shared by the e2e modules whose tests run on one module-scoped ``stack``
(``tests/e2e/stack.py``); each module starts its own stack with the settings it needs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from livekit import api


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed test of a module with a ``stack`` prints the tail of every process log."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "stack" in request.fixturenames:
        request.getfixturevalue("stack").dump_logs(lines=80)


@pytest.fixture
async def lkapi(stack: Any) -> AsyncIterator[api.LiveKitAPI]:
    """livekit-server's API on the module's stack (its own view of rooms and participants)."""
    client = api.LiveKitAPI(stack.livekit_url.replace("ws", "http", 1), "devkey", "secret")
    yield client
    await client.aclose()
