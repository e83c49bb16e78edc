"""NATS credentials and TLS from the environment (shared/natsauth.py): errors name the variable,
secrets stay out of repr, each service finds its own credentials in the credentials dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import config, natsauth, streams, subjects
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
        "user": "dispatcher", "password": "d-secret", "inbox_prefix": "_INBOX.dispatcher"}
    assert natsauth.from_env(env, natsauth.service_of("worker-job-AJ_1")).connect_options() == {
        "nkeys_seed": str(tmp_path / "worker.nk"), "inbox_prefix": "_INBOX.worker"}
    with pytest.raises(ConfigError, match="no sink.nk or sink.password"):
        natsauth.from_env(env, natsauth.service_of("crosstalk-sink"))


def _allowed(subject: str, patterns: list[str]) -> bool:
    """nats-server's matching: ``*`` one token, ``>`` one or more at the end."""
    toks, pats = subject.split("."), [p.split(".") for p in patterns]
    return any((len(p) <= len(toks) and p[-1] == ">" and all(a in ("*", b) for a, b in zip(p[:-1], toks, strict=False)))
               or (len(p) == len(toks) and all(a in ("*", b) for a, b in zip(p, toks, strict=True))) for p in pats)


def _perms(service: str) -> tuple[list[str], list[str]]:
    perms = natsauth.permissions(natsauth.ACCESS[service], service)
    return perms["publish"]["allow"], perms["subscribe"]["allow"]  # type: ignore[index]


STREAMS = [str(s.name) for s in streams.ALL_STREAMS] + [natsauth.RECORDINGS_STREAM]


@pytest.mark.parametrize("service", list(natsauth.ACCESS))
def test_no_service_may_delete_purge_or_rewrite_a_stream(service: str) -> None:
    pub, sub = _perms(service)
    for stream in STREAMS:
        for op in ("DELETE", "PURGE", "UPDATE", "CREATE", "MSG.DELETE", "SNAPSHOT", "RESTORE"):
            assert not _allowed(f"$JS.API.STREAM.{op}.{stream}", pub), (service, op, stream)
    assert not _allowed("$JS.API.STREAM.CREATE.EVIL", pub)
    assert not any(_allowed(s, sub) for s in ("roles.x.customer", "conv.b.c.turn", ">", "_INBOX.x", "_INBOX.nobody.x"))
    assert not _allowed("$JS.API.CONSUMER.CREATE.ROLES", pub) and not _allowed("$JS.API.CONSUMER.CREATE.ROLES.x.>", pub)
    assert _allowed(f"{natsauth.inbox_prefix(service)}.abc.1", sub)
    assert _allowed(subjects.BATCH_START, pub) == (service == "cli")


def test_each_service_acks_and_deletes_only_its_own_consumers() -> None:
    pub, _ = _perms("sink")
    assert _allowed("$JS.ACK.CONVERSATIONS.sink-conv.1.2.3.4.5", pub)
    assert not _allowed("$JS.ACK.CONVERSATIONS.dispatcher-conv.1.2.3.4.5", pub)
    assert not _allowed("$JS.API.CONSUMER.DELETE.BATCH_EVENTS.judge", pub)
    pub, _ = _perms("dispatcher")
    assert _allowed("$JS.API.CONSUMER.DELETE.CONVERSATIONS.dispatcher-conv", pub)
    assert not _allowed("$JS.API.CONSUMER.DELETE.CONVERSATIONS.sink-conv", pub)
    pub, sub = _perms("worker")  # a worker: its subjects and the recordings bucket, no stream API at all
    assert not any(p.startswith("$JS.API.CONSUMER") for p in pub) and sub == ["_INBOX.worker.>"]
    assert _allowed("$O.crosstalk-recordings.C.x", pub) and not _allowed("$JS.API.STREAM.PURGE.OBJ_crosstalk-recordings",
                                                                          pub)


def test_the_streams_are_the_operators_only_with_per_service_credentials() -> None:
    assert natsauth.streams_by_operator({"CROSSTALK_NATS_CREDENTIALS_DIR": "/x"})
    assert not natsauth.streams_by_operator({"CROSSTALK_NATS_USER": "svc"})


def test_docs_security_table_is_the_profiles_own() -> None:
    from infra.stack.secure import table

    doc = (Path(__file__).parents[2] / "docs" / "security.md").read_text()
    generated = doc.split("<!-- permission table: generated, do not edit -->\n", 1)[1].split("<!-- end", 1)[0]
    assert generated == table(), "docs/security.md: paste `python -m infra.stack.secure --table`"


@pytest.mark.parametrize("var", config.BIND_VARS)
def test_the_public_livekit_secret_is_refused_beyond_loopback(var: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load({var: "10.0.0.5"})
    assert exc.value.var == var and "LIVEKIT_API_SECRET" in exc.value.reason
    assert config.load({var: "10.0.0.5", "LIVEKIT_API_SECRET": "a-secret-of-our-own"}).livekit_api_secret
    assert config.load({var: "127.0.0.1"}) == config.load({})
