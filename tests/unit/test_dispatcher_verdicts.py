"""Pairing ``batch.start`` requests with the durable consumer's verdicts (no broker needed)."""

from __future__ import annotations

import asyncio

from services.dispatcher.verdicts import Verdicts
from shared.contracts import BatchReply


async def test_identical_bodies_get_their_verdicts_first_come_first_served() -> None:
    v = Verdicts()
    first = asyncio.create_task(v.wait(b"{}", 5))
    second = asyncio.create_task(v.wait(b"{}", 5))
    other = asyncio.create_task(v.wait(b'{"conversations": 2}', 5))
    await asyncio.sleep(0)
    v.settle(b'{"conversations": 2}', BatchReply(accepted=True, batch_id="c"))
    v.settle(b"{}", BatchReply(accepted=True, batch_id="a"))
    v.settle(b"{}", BatchReply(accepted=True, batch_id="b"))
    assert [(await t).batch_id for t in (first, second, other)] == ["a", "b", "c"]  # type: ignore[union-attr]


async def test_a_verdict_that_arrives_before_its_request_is_kept_briefly() -> None:
    v = Verdicts(keep_s=0.2)
    v.settle(b"{}", BatchReply(accepted=False, field="$", reason="r"))
    assert await v.wait(b"{}", 1) == BatchReply(accepted=False, field="$", reason="r")
    v.settle(b"{}", BatchReply(accepted=True, batch_id="late"))
    await asyncio.sleep(0.3)
    assert await v.wait(b"{}", 0.05) is None  # expired: never handed to an unrelated later request


async def test_a_request_that_times_out_does_not_swallow_the_next_verdict() -> None:
    v = Verdicts()
    assert await v.wait(b"{}", 0.05) is None
    waiting = asyncio.create_task(v.wait(b"{}", 5))
    await asyncio.sleep(0)
    v.settle(b"{}", BatchReply(accepted=True, batch_id="x"))
    assert (await waiting) == BatchReply(accepted=True, batch_id="x")

