"""The local model's pure core: what to ask llama.cpp for a chat request, and the reply it makes of the answer.

No I/O, no clock, no llama.cpp here: :mod:`.engine` generates, :mod:`.main` streams. The wire
shapes (request decoding, chunks, the completion object) are the scripted model's
(:mod:`services.model.core`), so both servers speak the same OpenAI dialect.

How a request becomes a prompt (:func:`plan`): crosstalk's own lines in a system message (the
``[crosstalk scenario=...]`` marker and the ``[crosstalk script]`` line, which only the scripted
model reads) are dropped; system and developer messages become one system message; tool results
and assistant messages without text (a bare tool call) are left out; a conversation with no user
message yet gets a one-line cue to speak first. A spoken turn is then asked for as the next line of
the call's transcript (:func:`transcript_prompt`), not in the model's chat template; a verdict in the
template, under a grammar. A caller's turn whose opening speaks the agent's part is generated again
(:func:`caller_guard`, :class:`SpokenStream`).

Tool calls, without trusting a small model to write them:

- ``submit_verdict`` (a ``livekit.agents.evals`` judge, ``tool_choice="required"``): the answer is
  constrained by a grammar to ``Reasoning: ...`` then ``Verdict: pass|fail``, and becomes the call's
  arguments (:func:`verdict_reply`).
- ``end_conversation`` (offered to both agents): the reply is spoken text; when that text takes
  leave (a goodbye, see ``FAREWELL``) or names the tool, the text is followed by the call
  (:func:`spoken_reply`). The caller's prompt asks it to say goodbye when its goal is met or the
  agent gives up (shared/caller_prompt.py), so the goodbye is the model's decision.
"""

from __future__ import annotations

import json
import re

import msgspec

from services.model.core import ChatRequest, Reply, ended
from shared.scenarios import END_TOOL

VERDICT_TOOL = "submit_verdict"
VERDICTS = ("pass", "fail", "maybe")

# crosstalk's lines for the scripted model: the scenario marker and the embedded script
_CROSSTALK_LINE = re.compile(r"^\[crosstalk[ \]].*$\n?", re.M)
# a speaker label the model sometimes writes before its line ("Caller: ...", "**Agent:** ...")
_LABEL = re.compile(r"^\s*\**\s*(?:caller|customer|user|agent|assistant|support(?: agent)?|you)\s*\**\s*:\s*\**\s*",
                    re.I)
FAREWELL = re.compile(r"\b(good-?bye|bye|have a (?:nice|good|great|lovely) (?:day|evening|one)|take care)\b", re.I)
_TOOL_MENTION = re.compile(r"\[?\s*(?:call(?:ing)?\s+(?:the\s+)?)?`?" + END_TOOL + r"`?(?:\(\))?\s*(?:tool)?\s*\]?\.?",
                           re.I)

FIRST_TURN_CUE = "(The call has just been connected. Say your first line.)"
TRANSCRIPT = "Transcript:"
STOP = ["\n", "<|im_end|>", "<end_of_turn>", "Agent:", "Caller:"]
# A caller's turn that speaks the agent's part (measured: about half of the 0.5 B caller's first turns
# in the e2e call opened "Hi Maria Lopez, how can I assist you today?")
AGENT_LIKE = (r"\b(?:how (?:can|may|could) i (?:help|assist)|assist you|thanks? (?:you )?for calling|"
              r"is there anything else i can|i can help you)\b")
_CALLER_NAME = re.compile(r"\bYou are ([A-Z][\w'-]+)")  # "You are Maria Lopez, ..." in LiveKit's instructions


def caller_guard(system: str) -> re.Pattern[str]:
    """What a caller's opening must not say: the agent's phrases, or a greeting to the caller's own name."""
    found = _CALLER_NAME.search(system)
    own = rf"|^\W*(?:hi|hello|hey|good \w+)\W+{re.escape(found.group(1))}\b" if found else ""
    return re.compile(AGENT_LIKE + own, re.I)
_ROLE = re.compile(r"\[crosstalk scenario=\S+ role=(customer|support)")

# llama.cpp GBNF: a short reasoning, then the verdict, as two lines of text (the call's JSON is built
# here: a small model writes raw quotes, which end a JSON string early). No "maybe": offered it, the
# 0.5 B model answered "maybe" to 40 of 108 labelled criteria (benchmarks/bench_llm.py), so it decides.
VERDICT_GRAMMAR = r'''
root ::= "Reasoning: " [^\n]{1,400} "\nVerdict: " ("pass" | "fail")
'''
VERDICT_FORMAT = ("Answer in two lines: 'Reasoning: <one sentence citing what the assistant said>' and "
                  "'Verdict: pass' or 'Verdict: fail'. The assistant is the agent being judged.")
_VERDICT_TEXT = re.compile(r"Reasoning:\s*(.*?)\s*\nVerdict:\s*(\w+)", re.S)


class Plan(msgspec.Struct, frozen=True):
    """What to generate for one request: a chat (``messages``, the model's template) or a raw ``prompt``."""

    messages: list[dict[str, str]]
    kind: str  # "verdict" (grammar-constrained submit_verdict arguments) | "speech" (one spoken turn) | "silent"
    max_tokens: int
    temperature: float
    offers_end: bool
    role: str  # metrics/log label: judge | agent
    prompt: str | None = None  # speech: the call as a transcript to continue (see transcript_prompt)
    transcript_at: int = 0  # where the transcript starts in ``prompt``: no run of words from there on is repeated
    guard: str = ""  # crosstalk's customer: a turn whose opening matches this is generated again (caller_guard)


def _merge(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n" + m["content"]}
        else:
            out.append(m)
    return out


def prompt_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The request as a plain system/user/assistant conversation for the model's chat template."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for m in req.messages:
        text = m.text()
        if m.role in ("system", "developer"):
            text = _CROSSTALK_LINE.sub("", text).strip()
            if text:
                system.append(text)
        elif m.role in ("user", "assistant") and text.strip():
            turns.append({"role": m.role, "content": text.strip()})
    if not any(t["role"] == "user" for t in turns):
        turns.insert(0, {"role": "user", "content": FIRST_TURN_CUE})
    head = [{"role": "system", "content": "\n".join(system)}] if system else []
    return _merge(head + turns)


def plan(req: ChatRequest, *, max_tokens: int, temperature: float) -> Plan:
    if ended(req.messages):  # the end tool was called and answered: nothing more to say
        return Plan([], "silent", 0, 0.0, False, "agent")
    messages = prompt_messages(req)
    if req.offers(VERDICT_TOOL):
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n" + VERDICT_FORMAT}
        return Plan(messages, "verdict", max(max_tokens, 200), 0.0, False, "judge")
    role = speaker_role(req)
    prompt = transcript_prompt(messages, role)
    guard = caller_guard(messages[0]["content"] if messages[0]["role"] == "system" else "").pattern
    return Plan(messages, "speech", max_tokens, temperature, req.offers(END_TOOL), "agent", prompt,
                prompt.rfind(TRANSCRIPT), guard if role == "customer" else "")


def speaker_role(req: ChatRequest) -> str | None:
    """customer | support from crosstalk's marker, None for a plain client."""
    for m in req.messages:
        if m.role in ("system", "developer") and (found := _ROLE.search(m.text())):
            return found.group(1)
    return None


def transcript_prompt(messages: list[dict[str, str]], role: str | None) -> str:
    """The call as a transcript for the model to continue with the speaker's next line.

    Why not the chat template: a small instruct model asked in its template to *be* the caller answers
    as the helpful assistant it was tuned to be ("How can I help you?"), measured on the scripted
    scenarios; continuing a transcript after ``Caller:`` keeps it on its side of the call. The
    speaker is crosstalk's customer (``Caller``) or support (``Agent``) by the marker; a request
    without one is an agent's (a user's agent pointed at this model), answering a caller.
    """
    me, peer = ("Caller", "Agent") if role == "customer" else ("Agent", "Caller")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    lines = [f"{me if m['role'] == 'assistant' else peer}: {m['content']}" for m in messages
             if m["role"] != "system" and m["content"] != FIRST_TURN_CUE]
    if not lines:  # the line a call opens with (without one the caller greeted itself by name, measured)
        lines = [f"{peer}: Hello?"]
    head = f"{system}\n\n" if system else ""
    return (f"{head}A phone call; you are the {me.lower()}. {TRANSCRIPT}\n"
            + "".join(f"{line}\n" for line in lines) + f"{me}:")


def clean_start(text: str) -> str:
    """The reply without a leading speaker label or quote marks."""
    return _LABEL.sub("", text, count=1).lstrip().lstrip('"“')


def spoken_reply(raw: str, offers_end: bool) -> Reply:
    """One spoken turn from the model's text; a goodbye (or the tool named) ends the call when offered."""
    text = clean_start(raw).strip().rstrip('"”').strip()
    named = bool(_TOOL_MENTION.search(text)) if END_TOOL in text.lower() else False
    if named:
        text = _TOOL_MENTION.sub("", text).strip()
    ends = offers_end and (named or bool(FAREWELL.search(text)))
    if not text and not ends:
        text = "Sorry, could you say that again?"
    return Reply(text, ends, "agent")


def verdict_arguments(raw: str) -> dict[str, str]:
    """``{"verdict", "reasoning"}`` from the grammar-constrained answer; ``maybe`` if it is not one."""
    found = _VERDICT_TEXT.search(raw)
    if found is None or found.group(2) not in VERDICTS:
        return {"verdict": "maybe", "reasoning": f"the local model gave no valid verdict: {raw[:200]!r}"}
    return {"verdict": found.group(2), "reasoning": found.group(1).strip() or "no reasoning given"}


def verdict_reply(raw: str) -> Reply:
    return Reply("", True, "judge", VERDICT_TOOL, json.dumps(verdict_arguments(raw), ensure_ascii=False))


class SpokenStream:
    """Streams a spoken turn as it is generated, holding back what :func:`spoken_reply` may still cut.

    A leading speaker label is only known after a few characters, and a trailing mention of the end
    tool only at the end: the first ``_HEAD`` characters wait, and so does the last word and anything
    from a ``[``, a backquote or ``end_conv`` on.
    """

    _HEAD = 10
    _GUARDED = 60  # a caller's opening checked against AGENT_LIKE before any of it is sent
    _HOLD = re.compile(r"\[|`|end_conv|\(\)", re.I)

    def __init__(self, offers_end: bool, guard: str = "") -> None:
        self.offers_end = offers_end
        self.raw = ""
        self.sent = ""
        self.guard = re.compile(guard, re.I) if guard else None  # still to check the opening against
        self.rejected = False

    def settle(self) -> None:
        """Check the opening (once): ``rejected`` when it speaks the agent's part."""
        if self.guard is not None:
            self.rejected = bool(self.guard.search(clean_start(self.raw)))
            self.guard = None

    def feed(self, piece: str) -> str:
        self.raw += piece
        if self.guard and len(self.raw) >= self._GUARDED:
            self.settle()
        if len(self.raw) < self._HEAD or self.guard is not None or self.rejected:
            return ""
        safe = clean_start(self.raw)
        hold = self._HOLD.search(safe)
        if hold is not None:
            safe = safe[: hold.start()]
        safe = safe[: safe.rfind(" ") + 1] if " " in safe else ""
        return self._advance(safe)

    def finish(self) -> tuple[str, Reply]:
        reply = spoken_reply(self.raw, self.offers_end)
        rest = self._advance(reply.text)
        return rest, msgspec.structs.replace(reply, text=self.sent.strip())  # what the client was sent

    def _advance(self, safe: str) -> str:
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        out, self.sent = safe[len(self.sent):], safe
        return out
