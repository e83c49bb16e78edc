"""The base of every wire struct (shared/contracts.py and its parts): frozen, unknown fields ignored."""

from __future__ import annotations

import msgspec


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=False):
    pass
