"""Fuzz (hypothesis) over every decoder of external input: each either returns its value or raises its
documented error naming a field and a reason; nothing else escapes.

- ``batch.start``: ``services.dispatcher.inputs.decode_start`` (a :class:`StartBatch` or a
  :class:`Rejection`, never an exception), then ``validate`` (a :class:`BatchSpec` or a Rejection);
- ``role.request`` / ``role.renew`` / ``role.release``: ``contracts.decode`` -> ContractError;
- livekit-server webhooks: ``services.webhook.core.verify`` -> ``Rejected`` (unsigned, wrongly signed,
  or signed garbage), ``to_event`` / ``route`` on whatever verified;
- scenario files: ``shared.scenarios.decode_scenario`` -> ScenarioError;
- chat-completion requests: ``services.model.core.decode_request`` and ``plan_reply`` -> RequestError.

These are pure functions (no effect to be partial); that a refused body changes nothing on the wire is
shown by tests/integration/test_fuzz_wire.py against the real allocator and dispatcher.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit import api
from support.fuzz import LIBRARY, ids, json_values, named, objects, role_fields, start_bodies

from services.dispatcher.inputs import decode_start
from services.dispatcher.validate import Rejection, validate
from services.model import core as model
from services.webhook import core as webhook
from shared import contracts, scenarios
from shared.config import Settings
from shared.contracts import BatchSpec, ContractError, StartBatch

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # livekit's dev key
SETTINGS = Settings()
FUZZ = settings(max_examples=400, deadline=None)

@FUZZ
@given(body=start_bodies)
def test_batch_start_is_a_command_or_a_rejection_naming_a_field(body: bytes) -> None:
    cmd = decode_start(body)
    if isinstance(cmd, Rejection):
        named(cmd.field, cmd.reason)
        assert cmd.batch_id is None or contracts.is_id(cmd.batch_id)
        return
    assert isinstance(cmd, StartBatch)
    out = validate(cmd, SETTINGS, LIBRARY, received_at=1.0e9, seed="s")
    if isinstance(out, Rejection):
        named(out.field, out.reason)
    else:
        assert isinstance(out, BatchSpec) and contracts.is_id(out.batch_id) and out.scenario in LIBRARY
        assert 1 <= out.concurrency <= out.conversations <= SETTINGS.max_conversations


@FUZZ
@given(body=objects(role_fields), typ=st.sampled_from([contracts.RoleRequest, contracts.RoleRenew,
                                                       contracts.RoleRelease]))
def test_role_messages_decode_or_name_the_field(body: bytes, typ: type) -> None:
    try:
        msg = contracts.decode(body, typ)
    except ContractError as exc:
        named(exc.field, exc.reason)
        return
    assert contracts.is_token(msg.job_id) and contracts.is_token(msg.room)


def signed(body: bytes, key: str, secret: str) -> str:
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    return api.AccessToken(key, secret).with_sha256(digest).to_jwt()


VERIFIER, RECEIVER = webhook.make_receiver("devkey", "secret")
webhook_bodies = objects({
    "event": st.sampled_from(["room_started", "room_finished", "participant_joined", "participant_left", "x"]),
    "id": ids, "createdAt": st.integers(-1, 2**40).map(str) | json_values,
    "room": st.fixed_dictionaries({"name": ids, "sid": ids}) | json_values,
    "participant": st.fixed_dictionaries({"identity": ids, "kind": st.sampled_from(["AGENT", "STANDARD", "Z"]),
                                          "joinedAtMs": st.integers(-1, 2**63).map(str)}) | json_values,
})


@FUZZ
@given(body=webhook_bodies, how=st.sampled_from(["right", "none", "wrong-secret", "wrong-key", "other-body", "junk"]))
def test_webhooks_unsigned_or_wrongly_signed_are_401_and_signed_garbage_400(body: bytes, how: str) -> None:
    auth = {"right": lambda: signed(body, "devkey", "secret"), "none": lambda: None,
            "wrong-secret": lambda: signed(body, "devkey", "not-the-secret"),
            "wrong-key": lambda: signed(body, "otherkey", "secret"),
            "other-body": lambda: signed(body + b" ", "devkey", "secret"), "junk": lambda: "Bearer x.y.z"}[how]()
    try:
        ev = webhook.verify(body, auth, VERIFIER, RECEIVER)
    except webhook.Rejected as exc:
        assert how != "right" and exc.status == 401 or exc.status in (400, 401, 413), (how, exc.status)
        named(exc.outcome, exc.reason)
        assert "secret" not in exc.reason
        return
    assert how == "right"
    out = webhook.to_event(ev, 1.0)
    if out is not None:
        try:
            webhook.route(out)
        except webhook.Rejected as exc:
            assert exc.status == 400


scenario_fields = {
    "id": ids, "title": st.text(max_size=10), "language": st.sampled_from(["en", "hi"]),
    "roles": st.dictionaries(st.sampled_from(["customer", "support", "boss"]),
                             st.fixed_dictionaries({"name": st.text(max_size=5), "persona": st.text(max_size=5),
                                                    "goal": st.text(max_size=5)}) | json_values, max_size=3),
    "script": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["customer", "support", "x"]),
                                              "text": st.text(max_size=10)}, optional={"end": st.booleans()})
                       | json_values, max_size=4),
    "tags": json_values, "userdata": json_values,
}


@FUZZ
@given(body=objects(scenario_fields))
def test_scenario_files_decode_or_name_the_file_and_field(body: bytes) -> None:
    try:
        sc = scenarios.decode_scenario(body, "fuzz.json")
    except scenarios.ScenarioError as exc:
        assert exc.source == "fuzz.json"
        named(exc.field, exc.reason)
        return
    for role in ("customer", "support"):  # what the worker and the model do with a scenario
        sc.instructions(role)  # type: ignore[arg-type]
        sc.lines_for(role)  # type: ignore[arg-type]


def marker_text() -> st.SearchStrategy[str]:
    sc = st.sampled_from([*LIBRARY, "nope", "../x"])
    role = st.sampled_from(["customer", "support", "boss"])
    return st.builds(lambda s, r, lang, pre: f"{pre}[crosstalk scenario={s} role={r} lang={lang}]", sc, role,
                     st.sampled_from(["en", "hi", "zz"]), st.text(max_size=5))


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "x"])},
                                optional={"content": marker_text() | st.text(max_size=20) | json_values,
                                          "tool_calls": json_values, "tool_call_id": st.text(max_size=5),
                                          "name": st.sampled_from(["end_conversation", "x"])})
chat_fields = {"model": st.text(max_size=5), "messages": st.lists(message, max_size=5), "stream": st.booleans(),
               "tools": json_values, "tool_choice": json_values, "stream_options": json_values}


@FUZZ
@given(body=objects(chat_fields))
def test_chat_completion_requests_decode_or_name_the_param(body: bytes) -> None:
    try:
        req = model.decode_request(body)
        reply = model.plan_reply(req, LIBRARY.get)
    except model.RequestError as exc:
        assert exc.reason and str(exc)
        assert exc.body()["error"]["type"] == "invalid_request_error"
        return
    assert isinstance(reply.text, str) and reply.role in ("customer", "support", "none")
    model.completion_tokens(reply)
    model.count_tokens(req)
