"""The scripted model's pure core: validate a chat request, decide the reply, build OpenAI chunks.

No I/O and no clock here. ``main`` paces what this module builds.

How a reply is chosen: a system (or developer) message carries the marker line
``[crosstalk scenario=<id> role=<customer|support> lang=<lang>]`` (see
:meth:`shared.scenarios.Scenario.instructions`). The reply is the role's k-th script
line, where k is the number of assistant messages with text already in the request
(the turns this role has spoken). A line marked ``end`` is followed by an
``end_conversation`` tool call when the request offers that tool; an exhausted script
gets a short closing line and the same call. Once the request holds the result of an
``end_conversation`` call after the last assistant message, the reply is empty.
Without a marker (a user's own agent under test, or a plain client) the reply comes from the
scripts themselves: the support line after the script line equal to the last user message
(:mod:`.unmarked`); the generic line when no scenarios are given.

The script comes from the line after the marker when there is one
(``[crosstalk script] [{"text": ..., "end": ...}, ...]``, written by
:meth:`shared.scenarios.Scenario.instructions` for scenarios a batch carries inline),
else from the scenario library. A request that offers the ``submit_verdict`` tool (a
``livekit.agents.evals`` judge) gets a deterministic verdict (services/model/judge.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec

from shared.contracts import ROLES, Role
from shared.openai_errors import RequestError, decode_json
from shared.scenarios import END_TOOL, SCRIPT_PREFIX, Scenario, ScriptLine

from . import judge, unmarked

MessageRole = Literal["system", "developer", "user", "assistant", "tool", "function"]

MARKER_RE = re.compile(r"\[crosstalk scenario=([^\s\]]+) role=([^\s\]]+) lang=([^\s\]]+)\]")

GENERIC_REPLY = "Hello! I am the crosstalk scripted model; give me a scenario marker to play a script."

# Said when a role has spoken all its script lines but the conversation goes on.
CLOSING_LINES = {
    "en": "Thank you, that is everything from my side. Goodbye!",
    "hi": "धन्यवाद, मेरी तरफ़ से बस इतना ही। नमस्ते!",
    "hi-Latn": "Theek hai, shukriya! Meri taraf se bas itna hi. Bye!",
}


def closing_line(lang: str) -> str:
    """The closing line for ``lang`` (e.g. ``hi-Latn``), else its base language, else English."""
    return CLOSING_LINES.get(lang) or CLOSING_LINES.get(lang.split("-")[0]) or CLOSING_LINES["en"]


# --- request (what clients send; unknown fields such as temperature are ignored) ---


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class CalledFunction(msgspec.Struct, frozen=True):
    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    function: CalledFunction
    type: str = "function"


class Message(msgspec.Struct, frozen=True):
    role: MessageRole
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        return "".join(p.text or "" for p in self.content if p.type == "text")


class FunctionDef(msgspec.Struct, frozen=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct, frozen=True):
    type: str
    function: FunctionDef | None = None


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, frozen=True):
    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def offers(self, tool_name: str) -> bool:
        if self.tool_choice == "none":
            return False
        return any(t.function is not None and t.function.name == tool_name for t in self.tools or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


_decoder = msgspec.json.Decoder(ChatRequest)


def decode_request(body: bytes) -> ChatRequest:
    """Decode and validate a ``/v1/chat/completions`` body; raise :class:`RequestError`."""
    req = decode_json(_decoder, body)
    if not req.messages:
        raise RequestError("messages", "must contain at least one message")
    return req


# --- the reply ---


class Marker(msgspec.Struct, frozen=True):
    index: int  # of the message that carries it
    scenario: str
    role: Role
    lang: str


class Reply(msgspec.Struct, frozen=True):
    text: str
    end_call: bool  # follow the text with a tool call (end_conversation, or the judge's verdict)
    role: str  # bounded metrics label: customer | support | judge | none
    tool_name: str = END_TOOL
    tool_args: str = "{}"

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.end_call else "stop"


def find_marker(messages: list[Message]) -> Marker | None:
    """The first scenario marker in a system or developer message; RequestError if malformed."""
    for i, msg in enumerate(messages):
        if msg.role not in ("system", "developer"):
            continue
        m = MARKER_RE.search(msg.text())
        if m is None:
            continue
        scenario, role, lang = m.groups()
        if role not in ROLES:
            raise RequestError(f"messages[{i}].content", f"marker role {role!r} must be one of {ROLES}")
        return Marker(i, scenario, role, lang)
    return None


def ended(messages: list[Message]) -> bool:
    """True if a tool result for end_conversation follows the last assistant message."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    if last < 0:
        return False
    end_ids = {tc.id for tc in messages[last].tool_calls or () if tc.function.name == END_TOOL}
    return any(
        m.role == "tool" and (m.tool_call_id in end_ids or m.name == END_TOOL)
        for m in messages[last + 1 :]
    )


def spoken_turns(messages: list[Message]) -> int:
    """Assistant messages that said something: a bare tool-call message is not a turn."""
    return sum(1 for m in messages if m.role == "assistant" and m.text().strip())


def embedded_script(messages: list[Message], marker: Marker) -> list[ScriptLine] | None:
    """The role's script written after the marker (see the module docstring), or None."""
    for line in messages[marker.index].text().splitlines():
        if not line.startswith(SCRIPT_PREFIX):
            continue
        try:
            raw = json.loads(line[len(SCRIPT_PREFIX):])
            return [ScriptLine(role=marker.role, text=str(x["text"]), end=bool(x.get("end", False))) for x in raw]
        except (ValueError, TypeError, KeyError) as exc:
            raise RequestError(f"messages[{marker.index}].content", f"bad {SCRIPT_PREFIX} line: {exc}") from None
    return None


def plan_reply(req: ChatRequest, lookup: Callable[[str], Scenario | None],
               scripts: Callable[[], Iterable[Scenario]] | None = None) -> Reply:
    if req.offers(judge.VERDICT_TOOL):
        prompt = "\n".join(m.text() for m in req.messages if m.role == "user")
        return Reply("", True, "judge", judge.VERDICT_TOOL, judge.arguments(prompt))
    marker = find_marker(req.messages)
    if marker is None:
        if scripts is None:
            return Reply(GENERIC_REPLY, False, "none")
        return Reply(*unmarked.plan(req.messages, req.offers(END_TOOL), scripts()))
    lines = embedded_script(req.messages, marker)
    if lines is None:
        scenario = lookup(marker.scenario)
        if scenario is None:
            raise RequestError(f"messages[{marker.index}].content", f"unknown scenario {marker.scenario!r}")
        lines = scenario.lines_for(marker.role)
    if ended(req.messages):
        return Reply("", False, marker.role)
    offers_end = req.offers(END_TOOL)
    k = spoken_turns(req.messages)
    if k < len(lines):
        line = lines[k]
        return Reply(line.text, line.end and offers_end, marker.role)
    return Reply(closing_line(marker.lang), offers_end, marker.role)


# --- tokens and OpenAI wire shapes ---

_TOKEN_RE = re.compile(r"\s*\S+|\s+$")


def tokenize(text: str) -> list[str]:
    """Word-ish tokens (leading whitespace kept) that concatenate back to ``text`` exactly."""
    return _TOKEN_RE.findall(text)


def count_tokens(req: ChatRequest) -> int:
    return sum(len(tokenize(m.text())) for m in req.messages)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_tokens(reply: Reply) -> int:
    return len(tokenize(reply.text)) + (1 if reply.end_call else 0)


class ChunkMaker:
    """Builds ``chat.completion.chunk`` objects for one streamed completion."""

    def __init__(self, completion_id: str, created: int, model: str, *, include_usage: bool) -> None:
        self._head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self._head,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            out["usage"] = None
        return out

    def role(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def content(self, token: str) -> dict[str, Any]:
        return self._chunk({"content": token})

    def tool_call(self, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
        """The call's head (id, name, empty arguments), then its arguments, as OpenAI streams them."""
        head = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return [
            self._chunk({"tool_calls": [head]}),
            self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
        ]

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, finish_reason)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            **self._head,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        }


def completion(
    completion_id: str, created: int, model: str, reply: Reply, call_id: str, prompt_tokens: int
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    if reply.end_call:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": reply.tool_name, "arguments": reply.tool_args}}
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        ],
        "usage": usage(prompt_tokens, completion_tokens(reply)),
    }


def models_list(model_name: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "crosstalk"}],
    }
