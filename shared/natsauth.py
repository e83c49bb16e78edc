"""NATS credentials and TLS from the environment: every process's ``bus.connect`` reads them here.

One identity for every process::

    CROSSTALK_NATS_USER + CROSSTALK_NATS_PASSWORD (or CROSSTALK_NATS_PASSWORD_FILE)
    CROSSTALK_NATS_NKEY_SEED_FILE          (an nkey user seed file, instead of user/password)

or one per service (what the per-service NATS permissions need)::

    CROSSTALK_NATS_CREDENTIALS_DIR         <service>.nk (nkey seed) or <service>.password (user = service)

where ``<service>`` is the process's kind (dispatcher, allocator, sink, webhook, worker, judge, cli), and
TLS::

    CROSSTALK_NATS_TLS_CA                  CA bundle that signed the server's certificate
    CROSSTALK_NATS_TLS_CERT + _TLS_KEY     a client certificate, when the server verifies clients

Secrets (passwords, seeds) are read from the environment or files, never logged: :class:`NatsAuth`
keeps them out of ``repr`` and only :meth:`NatsAuth.connect_options` hands them to nats-py.

With per-service credentials each process's inboxes are ``_INBOX.<service>.…`` (nats-py's
``inbox_prefix``), so nats-server can let it hear its own replies and nobody else's, and the streams
are the ``operator``'s (:func:`streams_by_operator`): services only look them up. What each identity
may do is :data:`ACCESS`, the data the profile's permissions and docs/security.md's
table are made from.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared import streams, subjects
from shared.config import ConfigError

SERVICES = ("dispatcher", "allocator", "sink", "webhook", "worker", "judge", "cli")
OPERATOR = "operator"  # creates, updates and deletes streams (`./ct up`, `./ct check`); no service holds it


@dataclass(frozen=True)
class NatsAuth:
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey_seed_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    inbox_prefix: str | None = None

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
        if self.inbox_prefix is not None:
            opts["inbox_prefix"] = self.inbox_prefix
        return opts


def inbox_prefix(service: str) -> str:
    """Where ``service``'s replies arrive: the only inboxes its identity may subscribe to."""
    return f"_INBOX.{service}"


def streams_by_operator(env: Mapping[str, str] | None = None) -> bool:
    """Per-service identities (CROSSTALK_NATS_CREDENTIALS_DIR): the operator creates the streams, a
    service only waits for them; one shared identity (or none) still creates them itself."""
    e = os.environ if env is None else env
    return bool(e.get("CROSSTALK_NATS_CREDENTIALS_DIR", "").strip())


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
        tls = replace(tls, inbox_prefix=inbox_prefix(service))
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


# --------------------------------------------------------------------------- who may do what

RECORDINGS_STREAM = f"OBJ_{streams.RECORDINGS_BUCKET}"  # the object store's stream


@dataclass(frozen=True)
class Access:
    """What one identity may do on NATS; everything else nats-server refuses.

    ``publishes``: its own subjects (JetStream stores the ones a stream captures); ``hears``: core
    subscriptions besides its inboxes; ``waits_for``: streams it looks up (STREAM.INFO);
    ``durables``: its own consumers (stream, name): create, look up, delete, pull, ack;
    ``reads``: streams it reads with ephemeral consumers (no acks: they are ack-none or ordered);
    ``direct``: streams it reads message by message (direct and message gets);
    ``recordings``: "put" (write objects) or "get" (read them) in the recordings bucket;
    ``responds``: it answers requests (once, to the requester's inbox)."""

    publishes: tuple[str, ...] = ()
    hears: tuple[str, ...] = ()
    waits_for: tuple[str, ...] = ()
    durables: tuple[tuple[str, str], ...] = ()
    reads: tuple[str, ...] = ()
    direct: tuple[str, ...] = ()
    recordings: str = ""
    responds: bool = False


def _durable(d: streams.Durable) -> tuple[str, str]:
    return d.stream, d.name


def access(sink_prefix: str = "sink") -> dict[str, Access]:
    """Every service's :class:`Access` (the sink's durables named by ``CROSSTALK_SINK_DURABLE``)."""
    cmds, events, conv, roles, lk = (str(s.name) for s in streams.ALL_STREAMS)
    sink = streams.sink_consumers(sink_prefix)
    return {
        "dispatcher": Access(
            publishes=(subjects.BATCH_EVENTS_ALL, subjects.BATCH_REJECTED, subjects.DISPATCHER_STATUS),
            hears=(subjects.BATCH_START, subjects.BATCH_CANCEL, subjects.WORKER_CAPACITY_ALL),
            waits_for=(cmds, events, conv),
            durables=(_durable(streams.DISPATCHER_CMDS), _durable(streams.dispatcher_conv())),
            reads=(events,), responds=True),
        "allocator": Access(publishes=(subjects.ROLES_ALL,),
                            hears=(subjects.ROLE_REQUEST, subjects.ROLE_RENEW, subjects.ROLE_RELEASE),
                            waits_for=(roles,), direct=(roles,), responds=True),
        "sink": Access(waits_for=(conv, events, lk, roles), durables=tuple(_durable(d) for d in sink),
                       direct=(roles,), recordings="get"),
        "webhook": Access(publishes=(subjects.LK_ROOM_ALL,), waits_for=(lk,)),
        "worker": Access(publishes=(subjects.CONV_ALL, subjects.ROLE_REQUEST, subjects.ROLE_RENEW,
                                    subjects.ROLE_RELEASE, subjects.WORKER_CAPACITY_ALL), recordings="put"),
        # consumes batch events, writes files, publishes BatchJudged
        "judge": Access(publishes=(subjects.BATCH_EVENTS_ALL,), waits_for=(events,), durables=((events, "judge"),)),
        "cli": Access(publishes=(subjects.BATCH_START, subjects.BATCH_CANCEL),
                      hears=(subjects.DISPATCHER_STATUS,), waits_for=(cmds, events), reads=(events,)),
    }


ACCESS = access()


def permissions(a: Access, service: str) -> dict[str, object]:
    """nats-server's ``permissions`` block for ``a`` (JetStream API subjects name their stream and consumer)."""
    api = "$JS.API"
    pub: list[str] = list(a.publishes)
    pub += [f"{api}.STREAM.INFO.{s}" for s in a.waits_for]
    for s, d in a.durables:
        pub += [f"{api}.CONSUMER.INFO.{s}.{d}", f"{api}.CONSUMER.CREATE.{s}.{d}", f"{api}.CONSUMER.CREATE.{s}.{d}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{s}.{d}", f"{api}.CONSUMER.DELETE.{s}.{d}",
                f"{api}.CONSUMER.MSG.NEXT.{s}.{d}", f"$JS.ACK.{s}.{d}.>"]
    for s in a.reads:  # ephemeral consumers named by the client (nats-py), filtered: any name
        pub += [f"{api}.CONSUMER.CREATE.{s}.*.>", f"{api}.CONSUMER.INFO.{s}.*", f"{api}.CONSUMER.MSG.NEXT.{s}.*",
                f"$JS.FC.{s}.>"]
    for s in a.direct:
        pub += [f"{api}.DIRECT.GET.{s}", f"{api}.DIRECT.GET.{s}.>", f"{api}.STREAM.MSG.GET.{s}"]
    if a.recordings:
        obj = RECORDINGS_STREAM
        pub += [f"{api}.STREAM.INFO.{obj}", f"{api}.STREAM.MSG.GET.{obj}", f"{api}.DIRECT.GET.{obj}.>"]
        pub += [f"$O.{streams.RECORDINGS_BUCKET}.>"] if a.recordings == "put" else \
            [f"{api}.CONSUMER.CREATE.{obj}", f"{api}.CONSUMER.CREATE.{obj}.>", f"$JS.FC.{obj}.>",
                f"{api}.STREAM.NAMES"]  # nats-py's get finds the bucket's stream by subject
    perms: dict[str, object] = {"publish": {"allow": pub},
                                "subscribe": {"allow": [f"{inbox_prefix(service)}.>", *a.hears]}}
    if a.responds:
        perms["allow_responses"] = True
    return perms
