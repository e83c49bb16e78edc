"""Every message that crosses the wire, as frozen msgspec structs.

This module owns the public contracts (``batch.start``, ``role.request``,
``role.release``) and the internal events that services exchange over NATS
JetStream. Commands are imperative (``StartBatch``), events past tense
(``RoleGranted``, ``ConversationEnded``). Entrypoints decode bytes with
:func:`decode` so cores never see raw dicts; every decode error names the
field and the reason.

Subjects live in :mod:`shared.subjects`, streams in :mod:`shared.streams`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

Role = Literal["customer", "support"]
Mode = Literal["text", "voice"]
ROLES: tuple[Role, Role] = ("customer", "support")

# Ids reach NATS subjects and file paths: one token, no dots, wildcards, separators.
ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}\Z"
# Rooms and job ids come from LiveKit; allow what LiveKit produces (AJ_xxx, RM_xxx)
# but never a NATS token separator, wildcard, whitespace or path separator.
TOKEN_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}\Z"
_ID_RE = re.compile(ID_PATTERN)
_TOKEN_RE = re.compile(TOKEN_PATTERN)

BatchId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
Identity = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ContractError(ValueError):
    """A message that does not match its contract. ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def is_id(value: str) -> bool:
    # fullmatch: with match/search, "$" also matches before a trailing "\n".
    return bool(_ID_RE.fullmatch(value))


def is_token(value: str) -> bool:
    return bool(_TOKEN_RE.fullmatch(value))


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=False):
    pass


# --------------------------------------------------------------------------- batch


class StartBatch(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Public command on ``batch.start``. Every field optional; see ARCHITECTURE.md.

    Unknown fields are rejected, not ignored: a typo (``"conversation": 200``) must not
    silently run the default single conversation.
    """

    batch_id: BatchId | None = None
    conversations: Annotated[int, msgspec.Meta(ge=1)] = 1
    concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    scenario: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)] | None = None
    language: Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?\Z")] | None = None
    max_turns: Annotated[int, msgspec.Meta(ge=1, le=200)] = 8
    mode: Mode = "text"


class BatchSpec(Struct, frozen=True, kw_only=True):
    """A validated, fully defaulted batch: what the dispatcher plans from."""

    batch_id: str
    conversations: int
    concurrency: int
    scenario: str
    language: str
    max_turns: int
    mode: Mode


class BatchReply(Struct, frozen=True, kw_only=True):
    """Reply to a ``batch.start`` request, and the body of accepted/rejected events."""

    accepted: bool
    batch_id: str | None = None
    field: str | None = None
    reason: str | None = None
    duplicate: bool = False


class BatchAccepted(Struct, frozen=True, kw_only=True, tag="batch_accepted"):
    spec: BatchSpec
    at: float


class BatchRejected(Struct, frozen=True, kw_only=True, tag="batch_rejected"):
    batch_id: str | None
    field: str
    reason: str
    at: float


class ConversationDispatched(Struct, frozen=True, kw_only=True, tag="conversation_dispatched"):
    batch_id: str
    conversation_id: str
    attempt: int
    room: str
    at: float


class ConversationJoined(Struct, frozen=True, kw_only=True, tag="conversation_joined"):
    """Both roles granted and both agents in the room (dispatcher's confirmation)."""

    batch_id: str
    conversation_id: str
    attempt: int
    join_seconds: float
    at: float


class ConversationSettled(Struct, frozen=True, kw_only=True, tag="conversation_settled"):
    """Final word on one attempt: completed, or failed (maybe to be retried)."""

    batch_id: str
    conversation_id: str
    attempt: int
    outcome: Literal["completed", "failed"]
    reason: str
    retry: bool
    turns: int = 0
    at: float


class BatchFinished(Struct, frozen=True, kw_only=True, tag="batch_finished"):
    batch_id: str
    status: Literal["completed", "failed"]
    requested: int
    completed: int
    failed: int
    started_at: float
    finished_at: float


BatchEvent = BatchAccepted | ConversationDispatched | ConversationJoined | ConversationSettled | BatchFinished

# --------------------------------------------------------------------------- roles


class RoleRequest(Struct, frozen=True, kw_only=True):
    room: Token
    job_id: Token
    identity: Identity
    prefer: Role | None = None


class RoleReply(Struct, frozen=True, kw_only=True):
    granted: bool
    role: Role | None = None
    reason: str | None = None
    lease_s: float | None = None
    field: str | None = None
    lease: int | None = None  # the lease token: the ROLES stream sequence of its grant event


class RoleRenew(Struct, frozen=True, kw_only=True):
    """``role.renew``: extend exactly the lease ``lease`` of ``role``; never grants a role."""

    room: Token
    job_id: Token
    role: Role
    lease: Annotated[int, msgspec.Meta(ge=1)]


class RenewReply(Struct, frozen=True, kw_only=True):
    renewed: bool
    lease_s: float | None = None
    reason: str | None = None  # "superseded" | "expired" | "unknown" (or an error)
    field: str | None = None


class RoleRelease(Struct, frozen=True, kw_only=True):
    room: Token
    job_id: Token


class ReleaseReply(Struct, frozen=True, kw_only=True):
    released: bool
    role: Role | None = None
    reason: str | None = None
    field: str | None = None


class LeaseEvent(Struct, frozen=True, kw_only=True):
    """One event in a room/role lease log (subject ``roles.<room>.<role>``).

    Each event carries the full lease, so the state is a fold that the last
    event alone determines; see services.allocator.core.
    """

    kind: Literal["granted", "renewed", "released"]
    room: str
    role: Role
    job_id: str
    identity: str
    expires_at: float
    at: float
    # Fenced leases. ``lease``: the grant's stream sequence (None in a grant's own body: it is
    # known only once stored; readers take it from the stored message). ``lease_s``: how long
    # the lease lives from this event's JetStream timestamp (server time). ``fenced``: jobs that
    # lost or ended a role in this room, carried forward in every event of the room (the log
    # keeps only the last 16 events of a role); such a job is never granted a role again.
    lease: int | None = None
    lease_s: float | None = None
    fenced: tuple[str, ...] = ()


# --------------------------------------------------------------------------- conversations


class JobMetadata(Struct, frozen=True, kw_only=True):
    """Dispatch metadata the dispatcher hands each worker job."""

    batch_id: BatchId
    conversation_id: Token
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    scenario: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
    language: str
    mode: Mode
    max_turns: Annotated[int, msgspec.Meta(ge=1)]


class AgentJoined(Struct, frozen=True, kw_only=True, tag="agent_joined"):
    batch_id: str
    conversation_id: str
    attempt: int
    room: str
    role: Role
    job_id: str
    identity: str
    at: float


class TurnRecorded(Struct, frozen=True, kw_only=True, tag="turn"):
    batch_id: str
    conversation_id: str
    attempt: int
    turn: int
    role: Role
    text: str
    started_at: float
    ended_at: float
    first_token_s: float | None = None
    total_s: float | None = None
    language: str | None = None
    room: str | None = None
    lease: int | None = None  # the speaker's lease token; the sink stores only turns of a live lease


class ConversationEnded(Struct, frozen=True, kw_only=True, tag="conversation_ended"):
    batch_id: str
    conversation_id: str
    attempt: int
    room: str
    reason: str  # "end_conversation:<role>", "max_turns", "peer_left", "error:<...>", "denied:<...>"
    ok: bool
    turns: int
    role: Role | None = None
    at: float
    lease: int | None = None


ConversationEvent = AgentJoined | TurnRecorded | ConversationEnded

# --------------------------------------------------------------------------- livekit-server's view

RoomWebhookKind = Literal["room_started", "room_finished", "participant_joined", "participant_left"]


class RoomWebhook(Struct, frozen=True, kw_only=True):
    """One verified livekit-server webhook as crosstalk keeps it (``lk.room.<room>.<event>``).

    ``id`` is livekit-server's event id (its retries repeat it: the Nats-Msg-Id). ``at`` is
    the event's ``createdAt`` (server clock, whole seconds); ``joined_at`` the participant's
    ``joinedAtMs`` / 1000. ``kind`` is the participant kind in lower case (``agent``,
    ``standard``, ``sip``, ...). Room passwords and tokens are never copied here.
    """

    event: RoomWebhookKind
    id: Identity
    room: Token
    room_sid: str = ""
    identity: str | None = None
    participant_sid: str | None = None
    kind: str | None = None
    joined_at: float | None = None
    at: float
    received_at: float


# --------------------------------------------------------------------------- capacity

Count = Annotated[int, msgspec.Meta(ge=0)]


class WorkerCapacity(Struct, frozen=True, kw_only=True):
    """A worker process's heartbeat on ``worker.capacity.<worker_id>`` (core NATS, every ``interval_s``).

    ``capacity`` agent sessions at most, ``active`` running, ``free`` more it accepts (0 while
    ``closing``); ``rooms`` the room of every active job, one entry per job. See shared/capacity.py.
    """

    worker_id: Token
    agent_name: Token
    capacity: Count
    active: Count
    free: Count
    rooms: tuple[str, ...] = ()
    interval_s: float
    closing: bool = False
    livekit_worker_id: str | None = None
    at: float


class BatchQueue(Struct, frozen=True, kw_only=True):
    """One running batch in :class:`DispatcherStatus`: ``queued`` conversations its concurrency
    would run now but worker capacity does not admit yet; ``pending`` all not yet in flight."""

    in_flight: Count
    queued: Count
    pending: Count


class DispatcherStatus(Struct, frozen=True, kw_only=True):
    """The dispatcher's admission view on ``dispatcher.status`` (core NATS, about every second)."""

    workers: Count
    capacity: Count
    free: Count
    reserved: Count
    queued: Count
    batches: dict[str, BatchQueue] = {}
    at: float


# --------------------------------------------------------------------------- codec

_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def _field_of(err: msgspec.ValidationError) -> str:
    # msgspec messages look like "Expected `int`, got `str` - at `$.conversations`"
    text = str(err)
    if " - at `$." in text:
        return text.rsplit(" - at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0]
    if "missing required field" in text:
        return text.split("`")[1] if "`" in text else "$"
    if "unknown field" in text.lower():
        return text.split("`")[1] if "`" in text else "$"
    return "$"


def _reason_of(err: msgspec.ValidationError) -> str:
    return str(err).split(" - at `", 1)[0]


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decode(data: bytes, typ: type[T], *, max_bytes: int = 64 * 1024) -> T:
    """Decode and validate ``data`` as ``typ``; raise :class:`ContractError` naming the field."""
    if len(data) > max_bytes:
        raise ContractError("$", f"payload is {len(data)} bytes, limit {max_bytes}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("$", f"payload is not valid UTF-8 (byte {exc.start})") from None
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return dec.decode(data)
    except msgspec.ValidationError as exc:
        return _raise(exc)
    except msgspec.DecodeError as exc:
        raise ContractError("$", f"not a JSON object: {exc}") from None


def _raise(exc: msgspec.ValidationError) -> Any:
    raise ContractError(_field_of(exc), _reason_of(exc)) from None


def decode_event(data: bytes, union: Any) -> Any:
    """Decode a tagged union (``BatchEvent``, ``ConversationEvent``)."""
    dec = _decoders.get(union)
    if dec is None:
        dec = _decoders[union] = msgspec.json.Decoder(union)
    try:
        return dec.decode(data)
    except msgspec.ValidationError as exc:
        return _raise(exc)
    except msgspec.DecodeError as exc:
        raise ContractError("$", f"not JSON: {exc}") from None
