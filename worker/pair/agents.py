"""The two roles: ``CustomerAgent`` and ``SupportAgent``.

Each is a ``livekit.agents.Agent`` whose instructions come from the scenario
(persona, goal, language). Both can end the call with ``end_conversation``. In voice mode the
end of the peer's speech goes to the conversation first (``on_user_turn_completed``).
"""

from __future__ import annotations

from typing import Protocol

from livekit.agents import Agent, RunContext, function_tool
from livekit.agents.llm import ChatContext, ChatMessage, StopResponse

from shared.contracts import Role
from shared.scenarios import Scenario


class Ender(Protocol):
    def request_end(self, reason: str) -> None: ...


class _RoleAgent(Agent):
    role: Role

    def __init__(self, scenario: Scenario, language: str, ender: Ender) -> None:
        super().__init__(instructions=scenario.instructions(self.role, language))
        self._ender = ender

    @function_tool
    async def end_conversation(self, context: RunContext) -> None:
        """End the call once the conversation has reached its natural end (goal met or nothing left to say)."""
        self._ender.request_end(f"end_conversation: {self.role}")
        raise StopResponse()  # no further reply after the goodbye

    async def on_user_turn_completed(self, turn_ctx: ChatContext, new_message: ChatMessage) -> None:
        """Voice mode: the peer's speech ended (VAD) and was transcribed; the conversation decides
        whether this is the end of its turn and the agent replies (worker/pair/voice_conversation.py)."""
        hear = getattr(self._ender, "on_user_turn", None)
        if hear is not None and not await hear(new_message.text_content or ""):
            raise StopResponse()


class CustomerAgent(_RoleAgent):
    role: Role = "customer"


class SupportAgent(_RoleAgent):
    role: Role = "support"


def agent_for(role: Role, scenario: Scenario, language: str, ender: Ender) -> Agent:
    cls = CustomerAgent if role == "customer" else SupportAgent
    return cls(scenario, language, ender)
