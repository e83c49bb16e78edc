"""The user's own agent (``batch.start`` ``target_agent``): what its room gets, as LiveKit's simulator gives it.

Pure: builds requests, does no I/O. With a target, an attempt's room gets two dispatches:

* crosstalk's own agent name, once: the job that plays the customer (worker/simulator.py). It
  joins as a standard participant carrying the ``lk.simulator`` attribute, the one an
  unmodified agent hears (RoomIO ignores agents) and whose departure ends the agent's job;
* the target's agent name, once, with the batch's ``target_metadata`` as its metadata and the
  attribute ``lk.simulator.dispatch``: a protojson ``SimulationDispatch`` (run id = the batch, job
  id = the conversation attempt, the scenario, the mode). livekit-server copies a dispatch's
  attributes onto the job, and livekit-agents (1.8.9, ``JobContext.simulation_context``) reads
  them from there: the agent sees its scenario and ``userdata`` as under LiveKit's own simulator,
  and in text mode its ``AgentSession`` drops STT/TTS/VAD by itself (checked against
  livekit-server 1.13.5, docs/ARCHITECTURE.md "Testing your own agent").

Admission counts one of crosstalk's agent sessions per target conversation (:func:`our_sessions`);
the target's own sessions are bounded by the batch's concurrency (one target job per room in
flight), and its worker refuses jobs above the load it reports to livekit-server, which then
never places the dispatch: that attempt ends ``target_no_show`` (worker/simulator.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from google.protobuf import json_format
from livekit import api
from livekit.protocol import agent_simulation as sim
from msgspec.structs import replace

from shared import contracts
from shared.contracts import BatchSpec, JobMetadata
from shared.scenarios import Scenario

ATTR_SIMULATOR_DISPATCH = "lk.simulator.dispatch"  # livekit-agents' ATTRIBUTE_SIMULATOR_DISPATCH
AGENTS_PER_ROOM = 2


def our_sessions(spec: BatchSpec) -> int:
    """crosstalk agent sessions one conversation of ``spec`` holds on crosstalk's workers."""
    return 1 if spec.target_agent else AGENTS_PER_ROOM


def simulation_dispatch(meta: JobMetadata, scenario: Scenario) -> sim.SimulationDispatch:
    """What the target's job reads through ``ctx.simulation_context()``."""
    customer = scenario.roles["customer"]
    return sim.SimulationDispatch(
        simulation_run_id=meta.batch_id,
        job_id=f"{meta.conversation_id}-{meta.attempt}",
        mode=sim.SIMULATION_MODE_AUDIO if meta.mode == "voice" else sim.SIMULATION_MODE_TEXT,
        scenario=sim.Scenario(
            id=scenario.id,
            label=scenario.display_label,
            # LiveKit's scenario instructions are the simulated user's: here, crosstalk's customer
            instructions=f"{customer.persona}\nGoal: {customer.goal}",
            agent_expectations=scenario.agent_expectations,
            tags=dict(scenario.tags),
            userdata=json.dumps(scenario.userdata, ensure_ascii=False) if scenario.userdata else "",
        ),
    )


def dispatches(room: str, meta: JobMetadata, our_agent: str,
               scenario: Scenario | None) -> list[api.CreateAgentDispatchRequest]:
    """Every dispatch an attempt's room needs. ``target_metadata`` goes to the target only."""
    ours = api.CreateAgentDispatchRequest(agent_name=our_agent, room=room,
                                          metadata=contracts.encode(replace(meta, target_metadata=None)).decode())
    if meta.target_agent is None:
        return [ours] * AGENTS_PER_ROOM
    if scenario is None:
        raise ValueError(f"scenario: unknown scenario {meta.scenario!r}")
    attrs = {ATTR_SIMULATOR_DISPATCH: json_format.MessageToJson(simulation_dispatch(meta, scenario), indent=None)}
    theirs = api.CreateAgentDispatchRequest(agent_name=meta.target_agent, room=room,
                                            metadata=meta.target_metadata or "", attributes=attrs)
    return [ours, theirs]


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

