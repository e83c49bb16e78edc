"""livekit-server's own view of a batch's rooms, polled in the background while the batch runs."""

from __future__ import annotations

import abc
import asyncio
from typing import Any, Self

from livekit import api


async def batch_rooms(lk: api.LiveKitAPI, prefix: str) -> list[tuple[Any, list[Any]]]:
    """Each room whose name starts with ``prefix``, with its participants, as livekit-server lists them now.

    A room deleted between list_rooms and list_participants is expected and skipped."""
    found: list[tuple[Any, list[Any]]] = []
    for room in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms:
        if not room.name.startswith(prefix):
            continue
        try:
            res = await lk.room.list_participants(api.ListParticipantsRequest(room=room.name))
        except api.TwirpError as exc:
            if exc.code == api.TwirpErrorCode.NOT_FOUND:
                continue
            raise
        found.append((room, list(res.participants)))
    return found


def stop_poller(task: asyncio.Task[None] | None, what: str) -> None:
    """End a background poller; one that failed fails the test with its own error (never swallowed)."""
    assert task is not None, f"{what} never started"
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise AssertionError(f"{what} failed: {task.exception()!r}") from task.exception()
    task.cancel()


class RoomPoller(abc.ABC):
    """``with Poller(lk, batch_id):`` hands every room of the batch and its participants to
    :meth:`saw`, every ``interval_s``, until the block ends."""

    interval_s = 0.25

    def __init__(self, lk: api.LiveKitAPI, prefix: str) -> None:
        self.lk, self.prefix = lk, prefix
        self._task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    def saw(self, room: Any, participants: list[Any]) -> None:
        """What a test records of one room and its participants at one poll."""

    async def _poll(self) -> None:
        while True:
            for room, participants in await batch_rooms(self.lk, self.prefix):
                self.saw(room, participants)
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> Self:
        self._task = asyncio.ensure_future(self._poll())
        return self

    def __exit__(self, *exc: object) -> None:
        stop_poller(self._task, f"{type(self).__name__} poller")
