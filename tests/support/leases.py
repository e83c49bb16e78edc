"""Grants written straight to the ROLES stream, for tests that publish turns without an allocator.

The sink stores a turn only if its ``lease`` was the live lease of its role in its room
(services/sink/fencing.py); these helpers give a test's turns such a lease.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from shared import bus, subjects
from shared.contracts import LeaseEvent, Role, TurnRecorded

LONG_S = 7 * 24 * 3600.0  # outlives any test


async def grant(js: JetStreamContext, room: str, role: Role, job_id: str | None = None,
                lease_s: float = LONG_S) -> int:
    """Append a grant of ``role`` in ``room``; its token (stream sequence)."""
    ack = await bus.publish(js, subjects.role_lease(room, role), LeaseEvent(
        kind="granted", room=room, role=role, job_id=job_id or f"AJ_{role}", identity=f"test-{role}",
        expires_at=0.0, at=0.0, lease_s=lease_s))
    return ack.seq


class Leases:
    """One long grant per (room, role), made on first use; ``room_of`` names a conversation's room."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, Role], int] = {}

    @staticmethod
    def room_of(t: TurnRecorded) -> str:
        return f"{t.batch_id}-{t.conversation_id}-{t.attempt}"

    async def leased(self, js: JetStreamContext, t: TurnRecorded) -> TurnRecorded:
        room = self.room_of(t)
        key = (room, t.role)
        if key not in self._tokens:
            self._tokens[key] = await grant(js, room, t.role)
        return msgspec.structs.replace(t, room=room, lease=self._tokens[key])
