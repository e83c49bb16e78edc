"""Every NATS subject crosstalk uses, in one place.

Ids that go into a subject are validated here (never build a subject by hand):
a ``.``, ``*``, ``>`` or whitespace in an id would change which messages a
subscriber sees.
"""

from __future__ import annotations

from shared.contracts import ID_RULE, ROLES, TOKEN_RULE, ContractError, Role, is_id, is_token

# Public commands (docs/ARCHITECTURE.md "Public contracts").
BATCH_START = "batch.start"
BATCH_CANCEL = "batch.cancel"  # {"batch_id": ...}: no new conversation starts; the batch ends cancelled
ROLE_REQUEST = "role.request"
ROLE_RELEASE = "role.release"
ROLE_RENEW = "role.renew"

# Dispatcher verdicts on commands that never became a batch (bad id, bad field).
BATCH_REJECTED = "batch.rejected"

# Batch lifecycle events, one subject per batch: batch.evt.<batch_id>
BATCH_EVENTS_PREFIX = "batch.evt"
BATCH_EVENTS_ALL = f"{BATCH_EVENTS_PREFIX}.*"

# Conversation events from worker jobs: conv.<batch_id>.<conversation_id>.<kind>
CONV_PREFIX = "conv"
CONV_ALL = f"{CONV_PREFIX}.>"
CONV_KINDS = ("joined", "turn", "ended", "recording")
# What the dispatcher follows: every agent join and every conversation end.
CONV_JOINED_ALL = f"{CONV_PREFIX}.*.*.joined"
CONV_ENDED_ALL = f"{CONV_PREFIX}.*.*.ended"

# Allocator lease log: roles.<room>.<role>
ROLES_PREFIX = "roles"
ROLES_ALL = f"{ROLES_PREFIX}.>"

# livekit-server's webhooks, verified and typed: lk.room.<room>.<event>
LK_ROOM_PREFIX = "lk.room"
LK_ROOM_ALL = f"{LK_ROOM_PREFIX}.>"
LK_ROOM_EVENTS = ("room_started", "room_finished", "participant_joined", "participant_left")

# Worker capacity heartbeats (core NATS, no stream): worker.capacity.<worker_id>
WORKER_CAPACITY_PREFIX = "worker.capacity"
WORKER_CAPACITY_ALL = f"{WORKER_CAPACITY_PREFIX}.*"
# The dispatcher's admission view (core NATS): workers, free slots, queued conversations per batch
DISPATCHER_STATUS = "dispatcher.status"

# Queue groups
ALLOCATOR_QUEUE = "allocator"


def _id(name: str, value: str) -> str:
    if not is_id(value):
        raise ContractError(name, ID_RULE)
    return value


def _token(name: str, value: str) -> str:
    if not is_token(value):
        raise ContractError(name, TOKEN_RULE)
    return value


def batch_events(batch_id: str) -> str:
    return f"{BATCH_EVENTS_PREFIX}.{_id('batch_id', batch_id)}"


def conv_event(batch_id: str, conversation_id: str, kind: str) -> str:
    if kind not in CONV_KINDS:
        raise ContractError("kind", f"must be one of {CONV_KINDS}")
    return f"{CONV_PREFIX}.{_id('batch_id', batch_id)}.{_token('conversation_id', conversation_id)}.{kind}"


def conv_batch_filter(batch_id: str) -> str:
    return f"{CONV_PREFIX}.{_id('batch_id', batch_id)}.>"


def conv_kind_filter(kind: str) -> str:
    """Every conversation's events of one kind, e.g. ``conv.*.*.turn``."""
    if kind not in CONV_KINDS:
        raise ContractError("kind", f"must be one of {CONV_KINDS}")
    return f"{CONV_PREFIX}.*.*.{kind}"


def role_lease(room: str, role: Role) -> str:
    if role not in ROLES:
        raise ContractError("role", "must be customer or support")
    return f"{ROLES_PREFIX}.{_token('room', room)}.{role}"


def worker_capacity(worker_id: str) -> str:
    return f"{WORKER_CAPACITY_PREFIX}.{_token('worker_id', worker_id)}"


def role_room(room: str) -> str:
    """Both role logs of one room (``roles.<room>.*``): the allocator's unit of consistency."""
    return f"{ROLES_PREFIX}.{_token('room', room)}.*"


def lk_room_event(room: str, event: str) -> str:
    if event not in LK_ROOM_EVENTS:
        raise ContractError("event", f"must be one of {LK_ROOM_EVENTS}")
    return f"{LK_ROOM_PREFIX}.{_token('room', room)}.{event}"
