"""The target's dispatch, created by crosstalk's customer once it is in the room (why: services/dispatcher/target.py).

The dispatch is the user's agent name with the batch's ``target_metadata`` as its metadata and
the attribute ``lk.simulator.dispatch``: a protojson ``SimulationDispatch`` (run id = the batch,
job id = ``<conversation>-<attempt>``, the scenario with its label, the customer's instructions,
``agent_expectations``, ``tags`` and ``userdata``, and the mode). livekit-server copies a
dispatch's attributes onto its job, where livekit-agents 1.8.9 reads them
(``JobContext.simulation_context``): checked against livekit-server 1.13.5.

Created at most once per room: the room's dispatches are listed first, and a create that
failed in transit is retried only if the listing shows it did not land.
"""

from __future__ import annotations

import asyncio
import json

from google.protobuf import json_format
from livekit import api
from livekit.protocol import agent_simulation as sim

from shared.config import Settings
from shared.contracts import JobMetadata
from shared.scenarios import Scenario

ATTR_SIMULATOR_DISPATCH = "lk.simulator.dispatch"  # livekit-agents' ATTRIBUTE_SIMULATOR_DISPATCH
TRIES = 3


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


def request(room: str, meta: JobMetadata, scenario: Scenario) -> api.CreateAgentDispatchRequest:
    assert meta.target_agent is not None
    attrs = {ATTR_SIMULATOR_DISPATCH: json_format.MessageToJson(simulation_dispatch(meta, scenario), indent=None,
                                                                ensure_ascii=False)}
    return api.CreateAgentDispatchRequest(agent_name=meta.target_agent, room=room,
                                          metadata=meta.target_metadata or "", attributes=attrs)


def _http(url: str) -> str:
    return "http" + url[2:] if url.startswith("ws") else url


async def dispatch_target(settings: Settings, room: str, meta: JobMetadata, scenario: Scenario) -> None:
    """Dispatch the target into ``room`` unless it already is; raises what livekit-server refused."""
    req = request(room, meta, scenario)
    lk = api.LiveKitAPI(_http(settings.livekit_url), settings.livekit_api_key, settings.livekit_api_secret)
    try:
        for attempt in range(TRIES):
            existing = await lk.agent_dispatch.list_dispatch(room)
            if any(d.agent_name == req.agent_name for d in existing):
                return
            try:
                await lk.agent_dispatch.create_dispatch(req)
                return
            except Exception:
                if attempt == TRIES - 1:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)  # then list again: it may have landed
    finally:
        await lk.aclose()
