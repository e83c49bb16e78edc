"""Sink configuration: environment to consumers, and bad settings named at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from nats.js.api import DeliverPolicy

from services.sink.main import consumers
from shared.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[2]


def test_settings_become_filtered_durable_consumers(tmp_path: Path) -> None:
    settings = load({
        "CROSSTALK_DATA_DIR": str(tmp_path), "CROSSTALK_SINK_DURABLE": "sink-a",
        "CROSSTALK_SINK_ACK_WAIT_S": "7.5", "CROSSTALK_SINK_DELIVER": "new",
    })
    assert (settings.data_dir, settings.sink_durable, settings.sink_ack_wait_s, settings.sink_deliver) == (
        tmp_path, "sink-a", 7.5, "new")
    conv, batch, lk, roles = ((c.stream, c.config) for c in consumers(settings))
    assert (conv[0], conv[1].durable_name, conv[1].filter_subjects) == (
        "CONVERSATIONS", "sink-a-conv", ["conv.*.*.turn", "conv.*.*.ended", "conv.*.*.recording"]
    )
    assert (batch[0], batch[1].durable_name, batch[1].filter_subjects) == ("BATCH_EVENTS", "sink-a-batch", ["batch.evt.*"])
    # the room audit: livekit-server's webhooks and the allocator's grant log
    assert (lk[0], lk[1].durable_name, lk[1].filter_subjects) == ("LIVEKIT_EVENTS", "sink-a-lk", ["lk.room.>"])
    assert (roles[0], roles[1].durable_name, roles[1].filter_subjects) == ("ROLES", "sink-a-roles", ["roles.>"])
    assert conv[1].deliver_policy == DeliverPolicy.NEW and conv[1].ack_wait == 7.5 and conv[1].max_deliver == -1
    defaults = load({})
    assert (defaults.sink_durable, defaults.sink_ack_wait_s, defaults.sink_deliver) == ("sink", 30.0, "all")
    assert consumers(defaults).conv.config.deliver_policy == DeliverPolicy.ALL


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CROSSTALK_SINK_DELIVER", "everything"),
        ("CROSSTALK_SINK_DURABLE", "a.b"),
        ("CROSSTALK_SINK_DURABLE", "x" * 65),
        ("CROSSTALK_SINK_DURABLE", "sink>"),
        ("CROSSTALK_SINK_ACK_WAIT_S", "0"),
        ("CROSSTALK_SINK_ACK_WAIT_S", "soon"),
    ],
)
def test_bad_sink_settings_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({var: value})
    assert err.value.var == var


def test_the_process_refuses_bad_settings_with_the_variable_named(tmp_path: Path) -> None:
    env = {**os.environ, "CROSSTALK_SINK_DELIVER": "sometimes", "CROSSTALK_DATA_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "services.sink"], cwd=ROOT, env=env, capture_output=True,
                          timeout=60)
    assert done.returncode == 2
    assert b"CROSSTALK_SINK_DELIVER" in done.stderr and b"bad configuration" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_process_refuses_a_data_dir_it_cannot_use(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {**os.environ, "CROSSTALK_DATA_DIR": str(blocker / "data"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "services.sink"], cwd=ROOT, env=env, capture_output=True,
                          timeout=60)
    assert done.returncode == 2
    assert b"CROSSTALK_DATA_DIR" in done.stderr
