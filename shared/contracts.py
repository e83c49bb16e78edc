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

from typing import Annotated, Any, Literal

import msgspec

# Re-exported: the codec, and the ids with their rules, are part of the contracts.
from shared.codec import decode, decode_event, encode  # noqa: F401
from shared.contracts_base import Struct
from shared.contracts_batch import BatchCancelled, CancelBatch  # noqa: F401  (re-exported: batch.cancel)
from shared.ids import (
    ID_PATTERN,
    ID_RULE,  # noqa: F401
    TOKEN_PATTERN,  # noqa: F401
    TOKEN_RULE,  # noqa: F401
    BatchId,
    ContractError,  # noqa: F401
    ConversationId,
    Identity,
    RoomName,
    Token,
    id_problem,  # noqa: F401
    is_id,  # noqa: F401
    is_token,  # noqa: F401
)

Role = Literal["customer", "support"]
HeardVia = Literal["stt", "speaker_text"]
Mode = Literal["text", "voice"]
ROLES: tuple[Role, Role] = ("customer", "support")
# ``target_metadata`` is handed to the user's agent as its dispatch metadata: bounded, like any input.
TARGET_METADATA_MAX_CHARS = 16384
TargetMetadata = Annotated[str, msgspec.Meta(max_length=TARGET_METADATA_MAX_CHARS)]



# --------------------------------------------------------------------------- batch


class StartBatch(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Public command on ``batch.start``. Every field optional; see docs/ARCHITECTURE.md.

    Unknown fields are rejected, not ignored: a typo (``"conversation": 200``) must not
    silently run the default single conversation.
    """

    batch_id: BatchId | None = None
    # Default 1; with ``scenarios`` / ``trials`` it is scenarios x trials, and a different value is refused.
    # (UNSET, not None: an explicit null is still refused)
    conversations: Annotated[int, msgspec.Meta(ge=1)] | msgspec.UnsetType = msgspec.UNSET
    concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    scenario: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)] | None = None
    language: Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?\Z")] | None = None
    max_turns: Annotated[int, msgspec.Meta(ge=1, le=200)] = 8
    mode: Mode = "text"
    # A LiveKit scenarios.yaml: a path relative to CROSSTALK_SCENARIO_DIR, or its scenario entries inline.
    scenarios: str | list[dict[str, Any]] | None = None
    # Each scenario runs this many times (pass^k is computed over them).
    trials: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    # The user's own agent (its registered agent name) takes the support role: services/dispatcher/target.py
    target_agent: Token | None = None
    target_metadata: TargetMetadata | None = None


class BatchScenario(Struct, frozen=True, kw_only=True):
    """One scenario a batch runs: its id and its entry as written (LiveKit fields + ``crosstalk:``)."""

    id: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
    doc: dict[str, Any]


class BatchSpec(Struct, frozen=True, kw_only=True):
    """A validated, fully defaulted batch: what the dispatcher plans from."""

    batch_id: BatchId
    conversations: int
    concurrency: int
    scenario: str
    language: str
    max_turns: int
    mode: Mode
    # With ``scenarios``/``trials``: conversation i runs scenarios[i % len(scenarios)], trial
    # i // len(scenarios) + 1 (shared/batch_plan.py). Empty: every conversation runs ``scenario``.
    scenarios: tuple[BatchScenario, ...] = ()
    trials: int = 1
    source: str | None = None  # the scenarios file it came from (relative path), None when inline
    target_agent: str | None = None
    target_metadata: str | None = None


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
    batch_id: BatchId
    conversation_id: ConversationId
    attempt: int
    room: RoomName
    at: float


class ConversationJoined(Struct, frozen=True, kw_only=True, tag="conversation_joined"):
    """Both roles granted and both agents in the room (dispatcher's confirmation)."""

    batch_id: BatchId
    conversation_id: ConversationId
    attempt: int
    join_seconds: float
    at: float


class ConversationSettled(Struct, frozen=True, kw_only=True, tag="conversation_settled"):
    """Final word on one attempt: completed, or failed (maybe to be retried)."""

    batch_id: BatchId
    conversation_id: ConversationId
    attempt: int
    outcome: Literal["completed", "failed"]
    reason: str
    retry: bool
    turns: int = 0
    at: float


class BatchFinished(Struct, frozen=True, kw_only=True, tag="batch_finished"):
    batch_id: BatchId
    status: Literal["completed", "failed", "cancelled"]  # cancelled: after an accepted batch.cancel
    requested: int
    completed: int
    failed: int
    started_at: float
    finished_at: float
    cancelled: int = 0  # never started (batch.cancel): requested = completed + failed + cancelled


class BatchJudged(Struct, frozen=True, kw_only=True, tag="batch_judged"):
    """Every conversation of a finished batch has its judgment (the judge service, services/judge).

    ``verdicts`` counts them: ``pass``, ``fail``, ``inconclusive`` and ``infra_failure`` (crosstalk's
    own faults); ``not_judged`` counts conversations with a criterion no judge could decide,
    ``judge_errors`` those whose judge model failed (retried once before this event)."""

    batch_id: BatchId
    conversations: int
    verdicts: dict[str, int]
    not_judged: int = 0
    judge_errors: int = 0
    at: float


BatchEvent = (BatchAccepted | ConversationDispatched | ConversationJoined | ConversationSettled | BatchFinished
              | BatchJudged | BatchCancelled)

# --------------------------------------------------------------------------- roles


class RoleRequest(Struct, frozen=True, kw_only=True):
    room: RoomName
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

    room: RoomName
    job_id: Token
    role: Role
    lease: Annotated[int, msgspec.Meta(ge=1)]


class RenewReply(Struct, frozen=True, kw_only=True):
    renewed: bool
    lease_s: float | None = None
    reason: str | None = None  # "superseded" | "expired" | "unknown" (or an error)
    field: str | None = None


class RoleRelease(Struct, frozen=True, kw_only=True):
    room: RoomName
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
    room: RoomName
    role: Role
    job_id: Token
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


def stamp(event: LeaseEvent, seq: int, ts: float) -> LeaseEvent:
    """A stored event as the rules read it: its lease token filled in (a grant's token is its
    own sequence) and ``expires_at`` on server time (its JetStream timestamp ``ts`` plus its
    ``lease_s``; a release ends the lease at ``ts``). Events written before ``lease_s``
    existed keep their duration ``expires_at - at``."""
    duration = event.lease_s if event.lease_s is not None else max(0.0, event.expires_at - event.at)
    lease = event.lease if event.lease is not None else (seq if event.kind == "granted" else None)
    expires = ts if event.kind == "released" else ts + duration
    return msgspec.structs.replace(event, lease=lease, expires_at=expires)


# --------------------------------------------------------------------------- conversations


class JobMetadata(Struct, frozen=True, kw_only=True):
    """Dispatch metadata the dispatcher hands each worker job."""

    batch_id: BatchId
    conversation_id: ConversationId
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    scenario: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
    language: str
    mode: Mode
    max_turns: Annotated[int, msgspec.Meta(ge=1)]
    # The scenario's entry when the batch carries its scenarios (a file or inline list): the
    # worker builds the scenario from it instead of its own library.
    scenario_doc: dict[str, Any] | None = None
    trial: int | None = None
    # set: this job is crosstalk's customer against the user's agent of that name (worker/simulator/customer.py)
    target_agent: Token | None = None
    target_metadata: TargetMetadata | None = None  # handed on as the target's dispatch metadata


class AgentJoined(Struct, frozen=True, kw_only=True, tag="agent_joined"):
    batch_id: BatchId
    conversation_id: ConversationId
    attempt: int
    room: RoomName
    role: Role
    job_id: Token
    identity: str
    at: float


class TurnRecorded(Struct, frozen=True, kw_only=True, tag="turn"):
    batch_id: BatchId
    conversation_id: ConversationId
    attempt: int
    turn: int
    role: Role
    text: str
    started_at: float
    ended_at: float
    first_token_s: float | None = None
    total_s: float | None = None
    language: str | None = None
    room: RoomName | None = None
    lease: int | None = None  # the speaker's lease token; the sink stores only turns of a live lease
    # voice mode: where the turn's speech lies in the conversation's recording (seconds from its
    # first audio), what the listener's STT made of it, and how the listener got its input
    # ("stt", or "speaker_text" where no offline STT exists for the language, e.g. Hindi)
    audio_start_s: float | None = None
    audio_end_s: float | None = None
    heard_text: str | None = None
    heard_via: HeardVia | None = None
    # said while no turn of the other role waited for it (a target's greeting, a follow-up): the
    # turn answers nothing, and two turns of one role may follow each other
    unprompted: bool = False


class ConversationEnded(Struct, frozen=True, kw_only=True, tag="conversation_ended"):
    batch_id: BatchId
    conversation_id: ConversationId
    attempt: int
    room: RoomName
    reason: str  # "end_conversation:<role>", "max_turns", "peer_left", "error:<...>", "denied:<...>"
    ok: bool
    turns: int
    role: Role | None = None
    at: float
    lease: int | None = None
    target_identity: str | None = None  # the user's agent in the room (target_agent batches)


class RecordingChannel(Struct, frozen=True, kw_only=True, tag="recording"):
    """Voice mode: one channel of a conversation's recording is in the object store.

    The listener of ``role`` recorded that role's track as the room carried it (16-bit mono PCM,
    ``sample_rate``), sample 0 at wall time ``start_at``; ``origin_at`` is the first audio of the
    conversation (the recording's time zero) as this listener knows it. The samples are the object
    :func:`shared.streams.recording_object` names in bucket :data:`shared.streams.RECORDINGS_BUCKET`.
    """

    batch_id: BatchId
    conversation_id: ConversationId
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    role: Role
    sample_rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)]
    start_at: float
    origin_at: float | None = None
    samples: Annotated[int, msgspec.Meta(ge=0)] = 0
    at: float


ConversationEvent = AgentJoined | TurnRecorded | ConversationEnded | RecordingChannel

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
    room: RoomName
    room_sid: str = ""
    identity: str | None = None
    participant_sid: str | None = None
    kind: str | None = None
    joined_at: float | None = None
    at: float
    received_at: float

# Re-exported: the capacity heartbeats and the dispatcher's status (shared/contracts_capacity.py).
from shared.contracts_capacity import BatchQueue, Count, DispatcherStatus, WorkerCapacity  # noqa: E402,F401
