"""OpenAI-style request errors for crosstalk's OpenAI-compatible servers (services/model, services/speech).

A bad request answers HTTP 400 with OpenAI's error body, ``param`` naming the field, so the
ordinary ``openai`` client raises ``BadRequestError`` with a message that says what to fix.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


class RequestError(ValueError):
    """A bad request; ``param`` names the field as OpenAI's error body does."""

    def __init__(self, param: str | None, reason: str) -> None:
        super().__init__(f"{param}: {reason}" if param else reason)
        self.param = param
        self.reason = reason

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": "invalid_request_error",
                "param": self.param,
                "code": None,
            }
        }


def param_of(err: msgspec.ValidationError) -> str | None:
    # msgspec: "Expected `str`, got `int` - at `$.messages[0].role`",
    # "Object missing required field `role` - at `$.messages[0]`"
    text = str(err)
    path = ""
    if " - at `$" in text:
        path = text.rsplit(" - at `$", 1)[1].rstrip("`").lstrip(".")
    if text.startswith("Object missing required field `"):
        missing = text.split("`")[1]
        path = f"{path}.{missing}" if path else missing
    return path or None


def decode_json(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode and type-check a JSON body; :class:`RequestError` naming the field otherwise."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        reason = str(exc).split(" - at `", 1)[0]
        if reason.startswith("Object missing required field"):
            reason = "is required"
        raise RequestError(param_of(exc), reason) from None
    except msgspec.DecodeError as exc:
        raise RequestError(None, f"request body is not valid JSON: {exc}") from None
