"""Ids and their rules: what may become a NATS subject token or a file name.

Typed ids (``BatchId``, ``ConversationId``, ``RoomName``, ``Token``) are validated by
msgspec when a message is decoded, so a decoded id has passed its rule once and stays
validated; ``ID_RULE`` / ``TOKEN_RULE`` say the rules in words, written only here.
Re-exported by :mod:`shared.contracts`.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

# Ids reach NATS subjects and file paths: one token, no dots, wildcards, separators.
ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}\Z"
# Rooms and job ids come from LiveKit; allow what LiveKit produces (AJ_xxx, RM_xxx)
# but never a NATS token separator, wildcard, whitespace or path separator.
TOKEN_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}\Z"
_ID_RE = re.compile(ID_PATTERN)
_TOKEN_RE = re.compile(TOKEN_PATTERN)

# The rules in words, the one place they are written. A decode error on a token field says
# TOKEN_RULE (the allocator's replies); one on a batch id keeps msgspec's regex (batch.start's).
ID_RULE = "must match [a-z0-9][a-z0-9-]{0,63}"
TOKEN_RULE = "must be 1-128 of [A-Za-z0-9_-], starting with a letter, digit or '_' (no '.', '*', '>', whitespace)"

BatchId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
ConversationId = Token
RoomName = Token
Identity = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class FieldError(ValueError):
    """A value that breaks a rule: ``field`` names the culprit, ``reason`` says what is wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ContractError(FieldError):
    """A message that does not match its contract. ``field`` names the culprit."""


def is_id(value: str) -> bool:
    # fullmatch: with match/search, "$" also matches before a trailing "\n".
    return bool(_ID_RE.fullmatch(value))


def is_token(value: str) -> bool:
    return bool(_TOKEN_RE.fullmatch(value))


def id_problem(batch_id: str, conversation_id: str | None = None) -> tuple[str, str] | None:
    """``(field, rule)`` for the first id that breaks its rule, else ``None`` (ids that
    become subjects or paths, checked where a message was built rather than decoded)."""
    if not is_id(batch_id):
        return "batch_id", ID_RULE
    if conversation_id is not None and not is_token(conversation_id):
        return "conversation_id", TOKEN_RULE
    return None
