"""The webhook receiver's decisions, with no I/O.

:func:`verify` checks a livekit-server webhook request the way LiveKit documents it
(livekit-api's ``WebhookReceiver``: the ``Authorization`` JWT is signed with the API
secret, names the API key as issuer, and carries the body's SHA-256) and parses it.
:func:`to_event` keeps what the room audit needs as a :class:`RoomWebhook`, and
:func:`route` says where it goes on JetStream (subject, Nats-Msg-Id = livekit's event
id, so its retries are deduplicated). Nothing here ever logs or returns a token,
a secret or the room's TURN password.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from google.protobuf.json_format import ParseError
from livekit.api import TokenVerifier, WebhookReceiver
from livekit.protocol.models import ParticipantInfo
from livekit.protocol.webhook import WebhookEvent

from shared import subjects
from shared.contracts import ContractError, RoomWebhook, is_token

AUDITED = subjects.LK_ROOM_EVENTS
MAX_BODY = 256 * 1024


class Rejected(Exception):
    """A request that is not a genuine webhook. ``status`` is the HTTP answer, ``reason`` safe to log."""

    def __init__(self, status: int, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome  # a metrics label: unauthorized | bad_request
        self.reason = reason


def unauthorized(reason: str) -> Rejected:
    return Rejected(401, "unauthorized", reason)


def make_receiver(api_key: str, api_secret: str) -> tuple[TokenVerifier, WebhookReceiver]:
    verifier = TokenVerifier(api_key, api_secret)
    return verifier, WebhookReceiver(verifier)


def verify(body: bytes, auth: str | None, verifier: TokenVerifier, receiver: WebhookReceiver) -> WebhookEvent:
    """The parsed event, or :class:`Rejected` (401 for anything unsigned or signed wrong)."""
    if not auth:
        raise unauthorized("no Authorization header")
    if len(body) > MAX_BODY:
        raise Rejected(413, "bad_request", f"body is {len(body)} bytes, limit {MAX_BODY}")
    token = auth.removeprefix("Bearer ").strip()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise unauthorized("body is not UTF-8") from None
    try:
        verifier.verify(token)  # signature, issuer (our API key), expiry: a clear reason first
    except jwt.InvalidTokenError as exc:
        raise unauthorized(f"token rejected: {type(exc).__name__}") from None
    except ValueError as exc:
        raise unauthorized(f"token rejected: {type(exc).__name__}") from None
    try:
        return receiver.receive(text, token)
    except ParseError:
        raise Rejected(400, "bad_request", "signed body is not a webhook event") from None
    except jwt.InvalidTokenError as exc:
        raise unauthorized(f"token rejected: {type(exc).__name__}") from None
    except Exception as exc:  # "sha256 was not found in the token", "hash mismatch"
        raise unauthorized(f"signature does not cover this body: {str(exc)[:60]}") from None


def _kind(p: ParticipantInfo) -> str:
    return str(ParticipantInfo.Kind.Name(p.kind)).lower()


def to_event(ev: WebhookEvent, received_at: float) -> RoomWebhook | None:
    """The audit's view of ``ev``; ``None`` for events the audit does not use
    (tracks, egress, ingress) or rooms whose name cannot be a subject token."""
    if ev.event not in AUDITED or not ev.id or not is_token(ev.room.name):
        return None
    p = ev.participant if ev.event.startswith("participant_") else None
    return RoomWebhook(
        event=ev.event,  # type: ignore[arg-type]  # checked against AUDITED above
        id=ev.id,
        room=ev.room.name,
        room_sid=ev.room.sid,
        identity=p.identity if p is not None else None,
        participant_sid=p.sid if p is not None else None,
        kind=_kind(p) if p is not None else None,
        joined_at=(p.joined_at_ms / 1000 if p.joined_at_ms else float(p.joined_at) or None) if p is not None else None,
        at=float(ev.created_at),
        received_at=received_at,
    )


@dataclass(frozen=True)
class Route:
    subject: str
    msg_id: str


def route(event: RoomWebhook) -> Route:
    try:
        subject = subjects.lk_room_event(event.room, event.event)
    except ContractError as exc:  # to_event only builds valid ones; keep the reason if not
        raise Rejected(400, "bad_request", f"{exc.field}: {exc.reason}") from None
    return Route(subject, f"lk:{event.id}")
