"""JSON encoding and validated decoding of the contracts; every decode error names the field.

Re-exported by :mod:`shared.contracts` (``contracts.decode`` and friends).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from shared.ids import TOKEN_PATTERN, TOKEN_RULE, ContractError

_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def _field_of(err: msgspec.ValidationError) -> str:
    # msgspec messages look like "Expected `int`, got `str` - at `$.conversations`"
    text = str(err)
    if " - at `$." in text:
        return text.rsplit(" - at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0]
    if "missing required field" in text or "unknown field" in text.lower():
        # an empty key ({"": 1}) has no name to report: the object itself ("$") is refused
        return (text.split("`")[1] if "`" in text else "") or "$"
    return "$"


_RULES = {TOKEN_PATTERN: TOKEN_RULE}


def _reason_of(err: msgspec.ValidationError) -> str:
    reason = str(err).split(" - at `", 1)[0]
    for pattern, rule in _RULES.items():
        if "matching regex" in reason and repr(pattern)[1:-1] in reason:
            return rule  # the rule in words instead of a regex
    return reason


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decode_as(data: bytes, typ: Any, not_json: str) -> Any:
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    try:
        return dec.decode(data)
    except msgspec.ValidationError as exc:
        raise ContractError(_field_of(exc), _reason_of(exc)) from None
    except msgspec.DecodeError as exc:
        raise ContractError("$", f"{not_json}: {exc}") from None


def decode(data: bytes, typ: type[T], *, max_bytes: int = 64 * 1024) -> T:
    """Decode and validate ``data`` as ``typ``; raise :class:`ContractError` naming the field."""
    if len(data) > max_bytes:
        raise ContractError("$", f"payload is {len(data)} bytes, limit {max_bytes}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError("$", f"payload is not valid UTF-8 (byte {exc.start})") from None
    return _decode_as(data, typ, "not a JSON object")


def decode_event(data: bytes, union: Any) -> Any:
    """Decode a tagged union (``BatchEvent``, ``ConversationEvent``)."""
    return _decode_as(data, union, "not JSON")
