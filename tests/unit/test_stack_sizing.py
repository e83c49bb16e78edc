"""`just up` sizes the worker processes to the machine (infra/stack/sizing.py), unless CROSSTALK_WORKERS says."""

from __future__ import annotations

import pytest

from infra.stack import sizing
from infra.stack.config import Config, StackError
from infra.stack.plan import plan


def test_cpu_bound_on_the_measured_machine() -> None:
    # 2 cores, 24 GB: 2 x 0.75 x 25 / 1.1 = 34 conversations -> 68 sessions -> 4 processes of 16
    n, why = sizing.size_workers(2, 24 * 1024, 16)
    assert n == 4
    assert "64 agent sessions (32 conversations at once)" in why and "CROSSTALK_WORKERS" in why


def test_memory_bound_and_never_zero() -> None:
    assert sizing.size_workers(16, 1024 + 3 * 626, 16)[0] == 3
    assert sizing.size_workers(16, 500, 16)[0] == 1
    assert sizing.size_workers(0.5, 64 * 1024, 16)[0] == 1
    assert sizing.size_workers(1000, 10**7, 16)[0] == sizing.MAX_WORKERS


def test_smaller_processes_make_more_of_them() -> None:
    assert sizing.size_workers(2, 24 * 1024, 8)[0] == 8


def test_crosstalk_workers_overrides_and_unset_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config.from_env({"CROSSTALK_WORKERS": "3"})
    assert cfg.workers == 3 and "CROSSTALK_WORKERS=3" in cfg.workers_why
    monkeypatch.setattr(sizing, "machine", lambda: (2.0, 24 * 1024.0))
    cfg = Config.from_env({})
    assert cfg.workers == 4 and "sized to this machine" in cfg.workers_why
    cfg = Config.from_env({"CROSSTALK_WORKER_MAX_JOBS": "8"})
    assert cfg.workers == 8
    with pytest.raises(StackError, match="CROSSTALK_WORKERS"):
        Config.from_env({"CROSSTALK_WORKERS": "auto"})


def test_many_sized_workers_skip_the_other_programs_metrics_ports() -> None:
    cfg = Config.from_env({"CROSSTALK_WORKERS": "20"})
    ports = cfg.worker_metrics_ports()
    assert len(ports) == len(set(ports)) == 20 and ports[0] == 9105
    assert not set(ports) & (set(cfg.metrics_ports.values()) - {9105})
    workers = [p for p in plan(cfg).programs if p.name.startswith("worker")]
    assert [w.env["CROSSTALK_METRICS_PORT"] for w in workers] == [str(p) for p in ports]
