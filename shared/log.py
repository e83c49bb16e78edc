"""Structured logging: one JSON object a line on stderr, never a secret."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_SECRET_KEYS = ("secret", "password", "token", "api_key", "apikey", "credentials")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            for k, v in extra.items():
                out[k] = "***" if any(s in k.lower() for s in _SECRET_KEYS) else v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(service: str, level: str = "INFO") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(service)


def kv(**fields: Any) -> dict[str, Any]:
    """``log.info("granted", extra=kv(room=r, role=role))``"""
    return {"fields": fields}
