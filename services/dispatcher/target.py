"""The user's own agent (``batch.start`` ``target_agent``): what the dispatcher does differently for it.

With a target, an attempt's room gets one dispatch of crosstalk's own agent name: the job that
plays the customer (worker/simulator/customer.py). That job dispatches the target itself, once it is in
the room (worker/simulator/target_dispatch.py): the target then finds the customer in its join response.
Dispatched at the same time, the target could join first and get the customer's first words
over the data channel before the signalling told it the customer exists; livekit-agents'
RoomIO then drops them ("participant not found, ignoring text input", seen here in 2 of 2
rooms of one test run).

Admission counts one of crosstalk's agent sessions per target conversation (:func:`our_sessions`);
the target's own sessions are bounded by the batch's concurrency (one target job per room in
flight), and its worker refuses jobs above the load it reports to livekit-server, which then
never places the dispatch. crosstalk cannot see that load, but it can tell "full" from "absent":
a ``target_no_show`` in a batch whose target has already joined other conversations becomes
``no_capacity`` (:func:`full_not_absent`), re-queued without using one of the conversation's
attempts, so the batch waits for the target's workers instead of failing on them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from livekit import api

from shared import contracts
from shared.contracts import BatchSpec, ConversationEnded, JobMetadata
from shared.metrics import reason_label

from .state import BatchState

AGENTS_PER_ROOM = 2


def our_sessions(spec: BatchSpec) -> int:
    """crosstalk agent sessions one conversation of ``spec`` holds on crosstalk's workers."""
    return 1 if spec.target_agent else AGENTS_PER_ROOM


def dispatches(room: str, meta: JobMetadata, our_agent: str) -> list[api.CreateAgentDispatchRequest]:
    """The dispatches an attempt's room needs from the dispatcher: crosstalk's two, or its one customer."""
    ours = api.CreateAgentDispatchRequest(agent_name=our_agent, room=room, metadata=contracts.encode(meta).decode())
    return [ours] if meta.target_agent else [ours] * AGENTS_PER_ROOM


def missing(wanted: Iterable[api.CreateAgentDispatchRequest], existing_agent_names: Iterable[str],
            ) -> list[api.CreateAgentDispatchRequest]:
    """The wanted dispatches not yet in the room (matched by agent name, counted)."""
    have = Counter(existing_agent_names)
    out = []
    for req in wanted:
        if have[req.agent_name] > 0:
            have[req.agent_name] -= 1
        else:
            out.append(req)
    return out


def full_not_absent(state: BatchState, ev: ConversationEnded) -> str | None:
    """The ``no_capacity`` reason for a ``target_no_show`` whose target served this batch before, else None."""
    if not state.spec.target_agent or reason_label(ev.reason) != "target_no_show":
        return None
    if not any(c.joined_at is not None for cid, c in state.convs.items() if cid != ev.conversation_id):
        return None  # never seen: absent (no worker registered under that name), not full
    return (f"no_capacity: agent {state.spec.target_agent!r} took no job while it serves this batch "
            f"(its workers report full): {ev.reason}")
