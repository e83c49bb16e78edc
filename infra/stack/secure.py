"""A secured NATS for the stack: TLS, one identity per service, and per-service publish permissions.

    python -m infra.stack.secure DIR      # writes DIR/{tls,creds,nats.conf}; prints the variables to export

Writes a CA and a server certificate (openssl, for the stack's host), a password per service
(``creds/<service>.password``, user = service) except the worker, which authenticates with an
nkey (``creds/worker.nk``, the seed; the server only holds its public key), an ``admin`` user for
operators and tests, and a nats-server config (the stack's own infra/nats.conf plus ``tls`` and
``authorization``). Export what it prints and `just up` runs nats-server with that config and
every process connects as its own service over TLS (shared/natsauth.py).

Each service may publish only its own subjects (and the JetStream API, acks, flow control and
replies to requests it received): a worker cannot publish ``batch.start``, a batch event, a lease
event or a webhook. Subscriptions are not restricted. Files with secrets are mode 0600 and nothing
here prints a secret.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import nkeys

from infra.stack.config import INFRA
from shared.streams import RECORDINGS_BUCKET

# What each service publishes (shared/subjects.py); everything else is refused by nats-server.
PUBLISHES: dict[str, list[str]] = {
    "dispatcher": ["batch.evt.*", "batch.rejected", "dispatcher.status"],
    "allocator": ["roles.>"],
    "sink": [],
    "webhook": ["lk.room.>"],
    # $O.<bucket>.>: a voice job puts its channel of the recording in the object store
    "worker": ["conv.>", "role.request", "role.renew", "role.release", "worker.capacity.*",
               f"$O.{RECORDINGS_BUCKET}.>"],
    "judge": ["batch.evt.*"],  # consumes batch events, writes files, publishes BatchJudged
    "cli": ["batch.start", "batch.cancel", "smoke.*"],  # smoke.*: `just check`'s JetStream round trip
}
COMMON = ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>"]  # streams/consumers API, acks, flow control
NKEY_SERVICES = ("worker",)  # authenticate with an nkey instead of a password


def _private(path: Path, data: str | bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(tls: Path, host: str) -> None:
    tls.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
             "-subj", "/CN=crosstalk test CA", "-keyout", str(tls / "ca.key"), "-out", str(tls / "ca.pem"))
    san = f"subjectAltName=IP:{host},DNS:localhost" if host.replace(".", "").isdigit() else \
        f"subjectAltName=DNS:{host},DNS:localhost"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=nats",
             "-keyout", str(tls / "server.key"), "-out", str(tls / "server.csr"))
    ext = tls / "server.ext"
    ext.write_text(san + "\n")
    _openssl("x509", "-req", "-in", str(tls / "server.csr"), "-CA", str(tls / "ca.pem"), "-CAkey", str(tls / "ca.key"),
             "-CAcreateserial", "-days", "30", "-extfile", str(ext), "-out", str(tls / "server.pem"))
    for key in ("ca.key", "server.key"):
        os.chmod(tls / key, 0o600)


def _permissions(service: str) -> dict[str, object]:
    return {"publish": {"allow": [*PUBLISHES[service], *COMMON]}, "subscribe": {"allow": [">"]},
            "allow_responses": True}


def write_profile(d: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """Write the profile into ``d``; returns the environment `just up` and every process need."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    make_certs(d / "tls", host)
    creds = d / "creds"
    creds.mkdir(exist_ok=True)
    os.chmod(creds, 0o700)
    users: list[dict[str, object]] = []
    for service in PUBLISHES:
        if service in NKEY_SERVICES:
            seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
            _private(creds / f"{service}.nk", seed)
            users.append({"nkey": nkeys.from_seed(bytearray(seed)).public_key.decode(),
                          "permissions": _permissions(service)})
        else:
            password = secrets.token_urlsafe(24)
            _private(creds / f"{service}.password", password)
            users.append({"user": service, "password": password, "permissions": _permissions(service)})
    admin = secrets.token_urlsafe(24)
    _private(creds / "admin.password", admin)
    users.append({"user": "admin", "password": admin})
    tls = d / "tls"
    # nats-server's config format accepts JSON values; the stack's base config comes first
    conf = (INFRA / "nats.conf").read_text() + "\n" + "\n".join([
        "tls " + json.dumps({"cert_file": str(tls / "server.pem"), "key_file": str(tls / "server.key"),
                             "ca_file": str(tls / "ca.pem"), "timeout": 5}),
        "authorization " + json.dumps({"users": users}, indent=2),
    ]) + "\n"
    _private(d / "nats.conf", conf)
    return {"CROSSTALK_NATS_CONF": str(d / "nats.conf"), "CROSSTALK_NATS_CREDENTIALS_DIR": str(creds),
            "CROSSTALK_NATS_TLS_CA": str(tls / "ca.pem")}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for var, value in write_profile(Path(sys.argv[1]).resolve()).items():
        print(f"export {var}={value}")
