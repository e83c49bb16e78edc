"""Fuzz on the wire: hypothesis bodies to the real dispatcher (``batch.start``) and the real allocator
(``role.request`` / ``role.renew`` / ``role.release``) over a real nats-server. Every refused body is
answered with the field and the reason and changes nothing: no batch event (only the documented
``batch.rejected`` record), no lease event in ROLES; both processes stay up and keep serving.
The bodies are tests/unit/test_fuzz_decoders.py's strategies; a body the decoders would accept is
not sent (it would rightly have an effect).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext
from support.fuzz import LIBRARY, objects, role_fields, start_bodies
from support.harness import Procs, agent_name, dispatcher_started, wait_for

from services.dispatcher.inputs import decode_start
from services.dispatcher.validate import Rejection, validate
from shared import contracts, streams, subjects
from shared.config import Settings
from shared.contracts import BatchReply, ContractError

SETTINGS = Settings()
WIRE = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ROLE_TYPES = {subjects.ROLE_REQUEST: (contracts.RoleRequest, contracts.RoleReply, "granted"),
              subjects.ROLE_RENEW: (contracts.RoleRenew, contracts.RenewReply, "renewed"),
              subjects.ROLE_RELEASE: (contracts.RoleRelease, contracts.ReleaseReply, "released")}


async def stream_msgs(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


@pytest.fixture
async def services(procs: Procs, bus_conn: tuple[Client, JetStreamContext]) -> Any:
    nc, js = bus_conn
    d = procs.dispatcher(CROSSTALK_AGENT_NAME=agent_name())
    a = procs.allocator()
    await dispatcher_started(js)
    return nc, js, d, a


def would_accept(body: bytes) -> bool:
    cmd = decode_start(body)
    return not isinstance(cmd, Rejection) and not isinstance(
        validate(cmd, SETTINGS, LIBRARY, received_at=1.0e9, seed="s"), Rejection)


@WIRE
@given(body=start_bodies)
async def test_fuzzed_batch_start_is_refused_naming_the_field_and_starts_nothing(services: Any, body: bytes) -> None:
    nc, js, d, _ = services
    if would_accept(body):
        return
    msg = await nc.request(subjects.BATCH_START, body, timeout=20)
    reply = contracts.decode(msg.data, BatchReply)
    assert not reply.accepted and reply.field and reply.reason, (body[:80], reply)
    assert await stream_msgs(js, streams.BATCH_EVENTS.name, subjects.BATCH_EVENTS_ALL) == 0
    assert d.alive()


@WIRE
@given(body=objects(role_fields), subject=st.sampled_from(sorted(ROLE_TYPES)))
async def test_fuzzed_role_messages_are_refused_naming_the_field_and_grant_nothing(
        services: Any, body: bytes, subject: str) -> None:
    nc, js, _, a = services
    typ, reply_typ, verb = ROLE_TYPES[subject]
    try:
        contracts.decode(body, typ)
        return  # a well-formed message: answered on its merits (test_allocator.py)
    except ContractError:
        pass
    before = await stream_msgs(js, streams.ROLES.name, subjects.ROLES_ALL)

    async def answered() -> Any:
        try:
            return await nc.request(subject, body, timeout=5)
        except Exception:
            return None  # the allocator still starting: no responders

    msg = await wait_for(answered, 60, f"the allocator to answer {subject}")
    reply = contracts.decode(msg.data, reply_typ)
    assert not getattr(reply, verb) and reply.reason, (body[:80], reply)
    assert getattr(reply, "field", "x"), (body[:80], reply)
    assert await stream_msgs(js, streams.ROLES.name, subjects.ROLES_ALL) == before
    assert a.alive()
