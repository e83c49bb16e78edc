"""A secured NATS for the stack: TLS, one identity per service, least privilege for each.

    python -m infra.stack.secure DIR      # writes DIR/{tls,creds,nats.conf}; prints the variables to export

Writes a CA and a server certificate (openssl, for the stack's host), a password per service
(``creds/<service>.password``, user = service) except the worker, which authenticates with an
nkey (``creds/worker.nk``, the seed; the server only holds its public key), an ``operator`` user
(creates, updates and deletes streams: `./ct up` and `./ct check` use it; no service holds it), and
a nats-server config (the stack's own infra/nats.conf plus ``tls`` and ``authorization``, passwords
as bcrypt hashes made by natscli's ``nats server passwd``). Export what it prints and `./ct up` runs
nats-server with that config, creates the streams as the operator (:func:`provision`), and every
process connects as its own service over TLS (shared/natsauth.py).

Each service may do only what ``shared.natsauth.ACCESS`` lists: publish its own subjects, look up and
consume the streams it uses through its own durables, hear its own inboxes (``_INBOX.<service>.>``)
and the subjects it serves. Files with secrets are mode 0600 and nothing here prints a secret.
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
from infra.stack.plan import find_binary
from shared import bus, natsauth, streams

# Every identity the profile writes; a service's permissions are natsauth.permissions(ACCESS[service]).
IDENTITIES = (*natsauth.ACCESS, natsauth.OPERATOR)
NKEY_SERVICES = ("worker",)  # authenticate with an nkey instead of a password
BCRYPT_COST = 11  # nats-server checks it once per connection; only the worker (an nkey) connects per job


def _private(path: Path, data: str | bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def bcrypt_hash(password: str) -> str:
    """``$2a$…`` as nats-server checks it, by natscli (the password goes through its environment, not argv)."""
    nats = find_binary("nats", "run ./ct or infra/install-tools.sh (natscli)", "CROSSTALK_NATSCLI_BIN")
    out = subprocess.run([nats, "server", "passwd", "-c", str(BCRYPT_COST)], env={**os.environ, "PASSWORD": password},
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith("$2"):
        raise RuntimeError("nats server passwd printed no bcrypt hash")
    return out


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


def write_profile(d: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """Write the profile into ``d``; returns the environment `just up` and every process need."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    make_certs(d / "tls", host)
    creds = d / "creds"
    creds.mkdir(exist_ok=True)
    os.chmod(creds, 0o700)
    users: list[dict[str, object]] = []
    for service in IDENTITIES:
        # the operator: every subject (it runs `./ct up`'s stream creation and `./ct check`)
        perms = {} if service == natsauth.OPERATOR else \
            {"permissions": natsauth.permissions(natsauth.ACCESS[service], service)}
        if service in NKEY_SERVICES:
            seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
            _private(creds / f"{service}.nk", seed)
            users.append({"nkey": nkeys.from_seed(bytearray(seed)).public_key.decode(), **perms})
        else:
            password = secrets.token_urlsafe(24)
            _private(creds / f"{service}.password", password)
            users.append({"user": service, "password": bcrypt_hash(password), **perms})
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


async def provision(nats_url: str) -> bool:
    """As the operator (`./ct up`): create or update every stream and the recordings bucket, which
    the services only look up. False (nothing done) without the profile's per-service credentials."""
    if not natsauth.streams_by_operator():
        return False
    nc = await bus.connect(nats_url, natsauth.OPERATOR)
    try:
        js = nc.jetstream(timeout=10)
        await streams.ensure_streams(js)
        await streams.recordings(js)
    finally:
        await nc.close()
    return True


def table() -> str:
    """docs/security.md's permission table, made from ``ACCESS`` (``python -m infra.stack.secure --table``)."""
    def cell(items: tuple[str, ...] | list[str]) -> str:
        return ", ".join(f"`{i}`" for i in items) or "–"

    rows = ["| identity | publishes | hears (and `_INBOX.<identity>.>`) | looks up | own durables: create, "
            "delete, pull, ack | reads (ephemeral consumers) | direct gets | recordings bucket |",
            "|---|---|---|---|---|---|---|---|"]
    for service, a in natsauth.ACCESS.items():
        rows.append(f"| {service} | {cell(a.publishes)}{' + replies' if a.responds else ''} | {cell(a.hears)} | "
                    f"{cell(a.waits_for)} | {cell([f'{s}.{d}' for s, d in a.durables])} | {cell(a.reads)} | "
                    f"{cell(a.direct)} | {a.recordings or '–'} |")
    rows.append(f"| {natsauth.OPERATOR} | everything: creates, updates, deletes and purges streams "
                "(`./ct up`, `./ct check`); held by no service | | | | | | |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        raise SystemExit(print(table(), end=""))
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for var, value in write_profile(Path(sys.argv[1]).resolve()).items():
        print(f"export {var}={value}")
