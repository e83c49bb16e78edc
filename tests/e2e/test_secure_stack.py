"""The security profile end to end: `just up` with NATS over TLS, one identity per service (bcrypt-hashed
passwords, the worker an nkey), least-privilege permissions (shared/natsauth.py ACCESS; the streams
the operator's), a LiveKit API secret and a model API key of our own; a batch runs through the whole
stack without one permission violation in nats-server's log; afterwards no log file, config the stack
or the profile wrote, or /metrics (every crosstalk process, livekit-server, nats-server's monitor)
holds any secret. What each identity must not do: tests/e2e/test_least_privilege.py.

The model "API key" goes to the scripted model through the real-model path (OPENAI_API_KEY +
OPENAI_BASE_URL pointing at the stack's own model server), the one way a key is ever sent.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from stack import Stack

from infra.stack.secure import IDENTITIES, write_profile
from shared import natsauth, subjects
from shared.contracts import BatchEvent, BatchFinished, decode_event

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str], list[str]]]:
    tmp = tmp_path_factory.mktemp("secure")
    profile = write_profile(tmp / "nats-secure")
    lk_secret, model_key = secrets.token_urlsafe(32), "sk-" + secrets.token_urlsafe(32)
    stack = Stack.create(tmp, LIVEKIT_API_SECRET=lk_secret, OPENAI_API_KEY=model_key, **profile)
    stack.env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{stack.env['CROSSTALK_MODEL_PORT']}/v1"
    creds = Path(profile["CROSSTALK_NATS_CREDENTIALS_DIR"])
    found = [lk_secret, model_key] + [p.read_text().strip() for p in sorted(creds.iterdir())]
    try:
        stack.up()
        yield stack, profile, found
    except BaseException:
        stack.dump_logs(lines=60)
        raise
    finally:
        stack.cleanup()


async def admin(stack: Stack, profile: dict[str, str], **kw: Any) -> nats.aio.client.Client:
    auth = natsauth.from_env(profile, service="cli").connect_options()  # for its TLS context
    password = (Path(profile["CROSSTALK_NATS_CREDENTIALS_DIR"]) / "operator.password").read_text()
    return await nats.connect(stack.nats_url, user="operator", password=password, tls=auth["tls"], **kw)


def scrape(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=10).read().decode(errors="replace")
    except OSError as exc:
        return f"<{url}: {exc}>"


async def run_batch(stack: Stack, profile: dict[str, str], body: dict[str, Any]) -> BatchFinished | None:
    """``batch.start`` sent as the CLI (its own identity), then the batch's BatchFinished (None: not in 300 s)."""
    cli = await nats.connect(stack.nats_url, **natsauth.from_env(profile, service="cli").connect_options())
    reply = json.loads((await cli.request(subjects.BATCH_START, json.dumps(body).encode(), timeout=30)).data)
    await cli.drain()
    assert reply["accepted"], reply
    nc = await admin(stack, profile)
    js = nc.jetstream()
    deadline = time.monotonic() + 300
    finished = None
    while finished is None and time.monotonic() < deadline:
        try:
            ev = decode_event((await js.get_last_msg("BATCH_EVENTS", subjects.batch_events(body["batch_id"]))).data,
                              BatchEvent)
            finished = ev if isinstance(ev, BatchFinished) else None
        except Exception:
            pass
        await asyncio.sleep(0.5)
    await nc.drain()
    return finished


async def test_a_batch_runs_with_tls_and_auth_and_no_secret_is_logged_or_exported(secure: Any) -> None:
    stack, profile, found = secure
    finished = await run_batch(stack, profile, {"batch_id": "secure-1", "conversations": 2, "concurrency": 2,
                                                "max_turns": 4})
    assert finished is not None and (finished.completed, finished.failed) == (2, 0), finished
    turns = list((stack.data_dir / "batches" / "secure-1" / "conversations").glob("*.jsonl"))
    assert len(turns) == 2 and all(len(p.read_bytes().splitlines()) == 4 for p in turns)

    texts: dict[str, str] = {}
    for path in sorted(stack.run_dir.rglob("*")):
        if path.is_file() and (path.suffix in (".log", ".conf", ".yaml", ".yml", ".json") or "log" in path.name):
            texts[str(path)] = path.read_text(errors="replace")
    texts["profile:nats.conf"] = Path(profile["CROSSTALK_NATS_CONF"]).read_text()  # bcrypt hashes only
    assert texts["profile:nats.conf"].count('"password": "$2a$') == len(IDENTITIES) - 1  # the worker: an nkey
    cfg = stack.config()
    ports = [int(v) for k, v in stack.env.items() if k.endswith("_METRICS_PORT")] + [cfg.model_port]
    for port in sorted(set(ports)):
        texts[f"metrics:{port}"] = scrape(f"http://127.0.0.1:{port}/metrics")
    mon = stack.env["CROSSTALK_NATS_MONITOR_PORT"]
    for page in ("varz", "connz?auth=1&subs=1", "jsz?accounts=1", "accountz"):
        texts[f"nats:{page}"] = scrape(f"http://127.0.0.1:{mon}/{page}")
    assert len([k for k in texts if k.startswith("metrics:") and "# TYPE" in texts[k]]) >= 6, list(texts)
    assert any(k.endswith("worker.log") for k in texts) and any(k.endswith("dispatcher.log") for k in texts)
    # every service connected as its own user (nats-server's own view), the worker with its nkey
    conns = json.loads(texts["nats:connz?auth=1&subs=1"])["connections"]
    users = {c.get("authorized_user") or c.get("nkey") for c in conns}
    assert {"dispatcher", "allocator", "sink", "webhook"} <= users, users
    worker_key = (Path(profile["CROSSTALK_NATS_CONF"]).read_text().split('"nkey": "', 1)[1]).split('"', 1)[0]
    assert worker_key in users or any(worker_key in json.dumps(c) for c in conns), users
    assert all(c.get("tls_version") for c in conns), [c.get("name") for c in conns if not c.get("tls_version")]
    # LiveKit secret, model key, the NATS secrets (one per identity, the operator's too)
    assert len(found) == 2 + len(IDENTITIES) and all(len(s) >= 24 for s in found)
    leaks = [(where, s[:4] + "...") for where, text in texts.items() for s in found if s in text]
    assert leaks == [], leaks
    assert not any("Permissions Violation" in t or "permissions violation" in t for t in texts.values()), \
        [k for k, t in texts.items() if "ermissions violation" in t]
    # nats-server's own view: nothing any service did was refused (Publish/Subscription Violation)
    violations = [line for k, t in texts.items() if k.endswith(".log") for line in t.splitlines() if "Violation" in line]
    assert violations == [], violations[:20]


def test_just_check_and_status_work_on_the_secured_stack(secure: Any) -> None:
    stack, _, _ = secure
    res = stack.just("check", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok  JetStream" in res.stdout
    assert stack.just("status", timeout=60).returncode == 0


async def test_a_worker_cannot_publish_another_services_subjects(secure: Any) -> None:
    stack, profile, _ = secure
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    worker = await nats.connect(stack.nats_url, error_cb=on_error,
                                **natsauth.from_env(profile, service="worker").connect_options())
    nc = await admin(stack, profile)
    js = nc.jetstream()
    stored = (await js.stream_info("BATCH_CMDS")).state.messages
    refused = [subjects.BATCH_START, subjects.batch_events("forged"), subjects.BATCH_REJECTED,
               "roles.forged-00000-a1.customer", "lk.room.forged.participant_joined", subjects.DISPATCHER_STATUS]
    for subject in refused:
        await worker.publish(subject, b'{"batch_id": "forged", "conversations": 1}')
    await worker.publish(subjects.worker_capacity("w-test"), b"{}")  # its own subject: allowed
    await worker.flush()
    deadline = time.monotonic() + 10
    while len(errors) < len(refused) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await worker.close()
    for subject in refused:
        assert f'nats: permissions violation for publish to "{subject}"' in errors, (subject, errors)
    assert len(errors) == len(refused), errors
    assert (await js.stream_info("BATCH_CMDS")).state.messages == stored
    await nc.drain()

    # no credentials, a wrong password, or no TLS: no connection at all
    for kw in ({}, {"user": "dispatcher", "password": "wrong"}):
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(stack.nats_url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0,
                               tls=natsauth.from_env(profile).connect_options()["tls"], **kw)
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await nats.connect(stack.nats_url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0,
                           user="operator", password="x")
