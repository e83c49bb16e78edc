"""The worker turns off livekit-agents' per-job loop monitor (a deadlock on CPython 3.11)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from livekit.agents.telemetry import loop_monitor

from worker.lifecycle import server


def test_loop_monitor_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(server.LOOP_MONITOR_ENV, raising=False)
    server.disable_loop_monitor()
    loop = asyncio.new_event_loop()
    try:
        # exactly what livekit-agents' job runner calls for every job loop
        assert loop_monitor.start_monitoring(loop, name="job") is None
    finally:
        loop.close()


def test_an_operator_can_turn_the_loop_monitor_back_on(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(server.LOOP_MONITOR_ENV, "250")
    with caplog.at_level(logging.WARNING, logger="worker"):
        server.disable_loop_monitor()
    loop = asyncio.new_event_loop()
    try:
        monitor = loop_monitor.start_monitoring(loop, name="job")
        assert monitor is not None and monitor.warn_threshold == pytest.approx(0.25)
        loop_monitor.stop_monitoring(loop)
    finally:
        loop.close()
    warned = any("gh-106883" in r.getMessage() for r in caplog.records)
    assert warned == (sys.version_info < (3, 12))
