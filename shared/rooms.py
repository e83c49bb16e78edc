"""Conversation room names: ``<conversation_id>-a<attempt>``, where a conversation id is
``<batch_id>-<5+ digits>``. The dispatcher names rooms with these; the sink's room audit
reads them back (livekit-server's webhooks name only the room)."""

from __future__ import annotations

import re

_ROOM_RE = re.compile(r"^(?P<conv>(?P<batch>[a-z0-9][a-z0-9-]*)-\d{5,})-a(?P<attempt>\d+)\Z")


def conversation_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:05d}"


def room_name(conv_id: str, attempt: int) -> str:
    return f"{conv_id}-a{attempt}"


def parse_room(name: str) -> tuple[str, int] | None:
    """``<conversation_id>-a<N>`` -> (conversation_id, N); None for rooms that are not ours."""
    m = _ROOM_RE.match(name)
    return (m["conv"], int(m["attempt"])) if m else None


def parse_room_full(name: str) -> tuple[str, str, int] | None:
    """``<batch_id>-<NNNNN>-a<N>`` -> (batch_id, conversation_id, N); None for rooms that are not ours."""
    m = _ROOM_RE.match(name)
    return (m["batch"], m["conv"], int(m["attempt"])) if m else None
