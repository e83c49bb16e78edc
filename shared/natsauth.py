"""NATS credentials and TLS from the environment: every process's ``bus.connect`` reads them here.

One identity for every process::

    CROSSTALK_NATS_USER + CROSSTALK_NATS_PASSWORD (or CROSSTALK_NATS_PASSWORD_FILE)
    CROSSTALK_NATS_NKEY_SEED_FILE          (an nkey user seed file, instead of user/password)

or one per service (what the per-service NATS permissions need)::

    CROSSTALK_NATS_CREDENTIALS_DIR         <service>.nk (nkey seed) or <service>.password (user = service)

where ``<service>`` is the process's kind (dispatcher, allocator, sink, webhook, worker, cli), and
TLS::

    CROSSTALK_NATS_TLS_CA                  CA bundle that signed the server's certificate
    CROSSTALK_NATS_TLS_CERT + _TLS_KEY     a client certificate, when the server verifies clients

Secrets (passwords, seeds) are read from the environment or files, never logged: :class:`NatsAuth`
keeps them out of ``repr`` and only :meth:`NatsAuth.connect_options` hands them to nats-py.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.config import ConfigError

SERVICES = ("dispatcher", "allocator", "sink", "webhook", "worker", "cli")


@dataclass(frozen=True)
class NatsAuth:
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey_seed_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.nkey_seed_file or self.tls_ca or self.tls_cert)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        opts: dict[str, Any] = {}
        if self.nkey_seed_file is not None:
            opts["nkeys_seed"] = str(self.nkey_seed_file)
        elif self.user is not None:
            opts["user"], opts["password"] = self.user, self.password or ""
        if self.tls_ca is not None or self.tls_cert is not None:
            ctx = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
            if self.tls_cert is not None:
                ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
            opts["tls"] = ctx
        return opts


def service_of(connection_name: str) -> str:
    """``crosstalk-allocator`` -> allocator, ``worker-job-AJ_x`` -> worker, ``dispatcher`` -> dispatcher."""
    return connection_name.removeprefix("crosstalk-").split("-", 1)[0]


def _file(env: Mapping[str, str], var: str) -> Path | None:
    raw = env.get(var, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(var, f"{raw} is not a readable file")
    return path


def _secret_file(path: Path, var: str) -> str:
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ConfigError(var, f"{path} is empty")
    return value


def from_env(env: Mapping[str, str] | None = None, service: str | None = None) -> NatsAuth:
    """The credentials ``service`` connects with (None: the shared ones only); ConfigError names the variable."""
    e = os.environ if env is None else env
    tls = NatsAuth(tls_ca=_file(e, "CROSSTALK_NATS_TLS_CA"), tls_cert=_file(e, "CROSSTALK_NATS_TLS_CERT"),
                   tls_key=_file(e, "CROSSTALK_NATS_TLS_KEY"))
    if tls.tls_key is not None and tls.tls_cert is None:
        raise ConfigError("CROSSTALK_NATS_TLS_KEY", "set CROSSTALK_NATS_TLS_CERT too (a key without its certificate)")
    creds_dir = e.get("CROSSTALK_NATS_CREDENTIALS_DIR", "").strip()
    if creds_dir:
        d = Path(creds_dir).expanduser()
        if not d.is_dir():
            raise ConfigError("CROSSTALK_NATS_CREDENTIALS_DIR", f"{creds_dir} is not a directory")
        if service is None:
            return tls
        if (d / f"{service}.nk").is_file():
            return replace(tls, nkey_seed_file=d / f"{service}.nk")
        if (d / f"{service}.password").is_file():
            return replace(tls, user=service, password=_secret_file(d / f"{service}.password",
                                                                    "CROSSTALK_NATS_CREDENTIALS_DIR"))
        raise ConfigError("CROSSTALK_NATS_CREDENTIALS_DIR", f"no {service}.nk or {service}.password in {creds_dir}")
    seed = _file(e, "CROSSTALK_NATS_NKEY_SEED_FILE")
    user = e.get("CROSSTALK_NATS_USER", "").strip() or None
    password = e.get("CROSSTALK_NATS_PASSWORD") or None
    pw_file = _file(e, "CROSSTALK_NATS_PASSWORD_FILE")
    if password and pw_file:
        raise ConfigError("CROSSTALK_NATS_PASSWORD_FILE", "set either it or CROSSTALK_NATS_PASSWORD, not both")
    if pw_file is not None:
        password = _secret_file(pw_file, "CROSSTALK_NATS_PASSWORD_FILE")
    if password and not user:
        raise ConfigError("CROSSTALK_NATS_USER", "must be set with a NATS password")
    if seed is not None and user:
        raise ConfigError("CROSSTALK_NATS_NKEY_SEED_FILE", "set either an nkey seed or a user/password, not both")
    return replace(tls, user=user, password=password, nkey_seed_file=seed)
