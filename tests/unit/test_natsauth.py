"""NATS credentials and TLS from the environment (shared/natsauth.py): errors name the variable,
secrets stay out of repr, each service finds its own credentials in the credentials dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import config, natsauth
from shared.config import ConfigError


def test_no_variables_means_no_auth() -> None:
    auth = natsauth.from_env({})
    assert not auth.enabled and auth.connect_options() == {}


def test_user_and_password_from_env_or_file_never_in_repr(tmp_path: Path) -> None:
    auth = natsauth.from_env({"CROSSTALK_NATS_USER": "svc", "CROSSTALK_NATS_PASSWORD": "hunter2-secret"})
    assert auth.connect_options() == {"user": "svc", "password": "hunter2-secret"}
    assert "hunter2" not in repr(auth) and "hunter2" not in str(auth)
    pw = tmp_path / "pw"
    pw.write_text("from-a-file\n")
    auth = natsauth.from_env({"CROSSTALK_NATS_USER": "svc", "CROSSTALK_NATS_PASSWORD_FILE": str(pw)})
    assert auth.password == "from-a-file" and "from-a-file" not in repr(auth)


@pytest.mark.parametrize(("env", "var"), [
    ({"CROSSTALK_NATS_PASSWORD": "x"}, "CROSSTALK_NATS_USER"),
    ({"CROSSTALK_NATS_PASSWORD_FILE": "/nonexistent"}, "CROSSTALK_NATS_PASSWORD_FILE"),
    ({"CROSSTALK_NATS_TLS_CA": "/nonexistent"}, "CROSSTALK_NATS_TLS_CA"),
    ({"CROSSTALK_NATS_NKEY_SEED_FILE": "/nonexistent"}, "CROSSTALK_NATS_NKEY_SEED_FILE"),
    ({"CROSSTALK_NATS_CREDENTIALS_DIR": "/nonexistent"}, "CROSSTALK_NATS_CREDENTIALS_DIR"),
])
def test_bad_settings_name_the_variable_at_start_up(env: dict[str, str], var: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(env)
    assert exc.value.var == var


def test_each_service_finds_its_own_credentials(tmp_path: Path) -> None:
    (tmp_path / "dispatcher.password").write_text("d-secret")
    (tmp_path / "worker.nk").write_text("SUAxxx")
    env = {"CROSSTALK_NATS_CREDENTIALS_DIR": str(tmp_path)}
    assert natsauth.from_env(env, natsauth.service_of("dispatcher")).connect_options() == {
        "user": "dispatcher", "password": "d-secret"}
    assert natsauth.from_env(env, natsauth.service_of("worker-job-AJ_1")).connect_options() == {
        "nkeys_seed": str(tmp_path / "worker.nk")}
    with pytest.raises(ConfigError, match="no sink.nk or sink.password"):
        natsauth.from_env(env, natsauth.service_of("crosstalk-sink"))
