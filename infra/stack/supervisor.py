"""Talking to this run dir's supervisord: its XML-RPC socket, the run-dir lock, the environment it starts with."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infra.stack.config import ROOT, TAG, Config
from shared.config import Settings

# Never in a file or a printed line; `up` only compares their fingerprint with the running stack's.
SECRET_VARS = ("LIVEKIT_API_SECRET", "LIVEKIT_KEYS", "OPENAI_API_KEY", "NATS_CREDS", "NATS_TOKEN", "NATS_PASSWORD")
RPC_ERRORS = (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError)


def rpc(cfg: Config) -> Any:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{cfg.sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_pid(cfg: Config) -> int | None:
    """The pid of this run dir's supervisord if it answers, else None."""
    if not cfg.sock.exists():
        return None
    try:
        return int(rpc(cfg).supervisor.getPID())
    except RPC_ERRORS:
        return None


def process_infos(cfg: Config) -> list[dict[str, Any]]:
    return list(rpc(cfg).supervisor.getAllProcessInfo())


def supervisor_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


@contextmanager
def locked(cfg: Config) -> Iterator[None]:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def secret_fingerprint() -> str:
    h = hashlib.sha256()
    for var in SECRET_VARS + ("OPENAI_BASE_URL", "LIVEKIT_API_KEY"):
        h.update(f"{var}={os.environ.get(var, '')}\0".encode())
    return h.hexdigest()


def supervisord_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    env[TAG] = str(cfg.run_dir)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(ROOT / ".tools" / "bin"), env.get("PATH", "")])
    env.setdefault("LIVEKIT_API_SECRET", Settings.livekit_api_secret)
    dev_keys = (Settings.livekit_api_key, Settings.livekit_api_secret)  # livekit-server --dev's own
    if not cfg.external_livekit and (cfg.livekit_key, env["LIVEKIT_API_SECRET"]) != dev_keys:
        env["LIVEKIT_KEYS"] = f"{cfg.livekit_key}: {env['LIVEKIT_API_SECRET']}"  # livekit-server reads it
    return env
