"""What crosstalk says about the agent under test, checked against what the agent itself logged.

Everything real: nats-server, livekit-server, every crosstalk service under `just up` (the offline
speech service included) and examples/target_agent as the user's own worker process. Both sides'
LLM clients go through a recording OpenAI-compatible endpoint (tests/support/recording_llm.py) in
front of the stack's scripted model: crosstalk's worker through OPENAI_BASE_URL (with
CROSSTALK_MODEL_NAME and CROSSTALK_SPEECH=offline, as a user with their own endpoint would), the
example agent through its own OPENAI_BASE_URL.

1. Latency. The example agent's model is held ``ACME_REPLY_DELAY_S`` (0, then 1.5 s) and it logs its
   own state changes (``ACME_STATE_LOG``). Per target turn, the agent's own response latency is
   its ``agent_state_changed`` -> ``speaking`` minus the last ``user_state_changed`` ``speaking`` ->
   ``listening`` before it (its VAD's end of the caller's speech); crosstalk's is the turn lines'
   ``audio_start_s`` of the target's turn minus ``audio_end_s`` of the customer turn before it (the
   heard latency of services/sink/core/voice.py). The delay's shift of the medians must be the same
   by both, within 0.2 s, and crosstalk's offset from the agent's view (median per turn of
   crosstalk's minus the agent's) must not move with it by more than 0.2 s: at concurrency 1 and 3.
   The agent's log, not the injected number, is the truth: the agent overlaps part of its model
   time with its own end-of-turn delay.
   At concurrency 3 this is an xfail, not strict (UNDER_LOAD: the measured reason).
2. Context. Every chat request of either agent carries the whole conversation so far, in order, as
   user/assistant messages, compared against the stored transcript: the speaker's own words as
   ``text``, the peer's as what this listener heard (``text`` in text mode, ``heard_text`` in
   voice mode: every segment its STT made of the turn). crosstalk's listeners end a stretch of speech
   at 0.2 s of silence here, so turns are heard in parts (the test says how many, and fails if none was).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stack import running_stack
from support.recording_llm import RecordingLLM
from support.target import Target, scenario_dir
from test_target import run_batch
from test_target_voice import VOICE_SCENARIO, voice_target
from test_voice import read_final, read_lines, read_recording

from services.sink.core import voice
from shared.rooms import room_name

pytestmark = pytest.mark.e2e

DELAY_S = 1.5  # the injected model delay of the slow run
MAX_TURNS = 6  # three customer turns, three answers: three latencies per conversation
TOLERANCE_S = 0.2
RUNS = {1: 2, 3: 3}  # concurrency -> conversations per run
# crosstalk's listeners end a stretch of speech at this much silence (CROSSTALK_VAD_MIN_SILENCE_S, default
# 0.35 s): below the pauses Piper leaves after a comma or between sentences (0.3-0.4 s, measured), so a
# turn like "Hello, I am locked out ..." reaches crosstalk's STT in several segments and the context test
# sees turns heard in parts (at 0.3 s they were not: the pauses must outlast Silero's own decay)
VAD_MIN_SILENCE_S = 0.2
PAUSE_S = VAD_MIN_SILENCE_S + 0.1  # a pause this long in the recording: the listener's VAD cut the turn there


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingLLM]:
    with RecordingLLM(tmp_path_factory.mktemp("llm") / "requests.jsonl") as rec:
        yield rec


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, llm: RecordingLLM) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("ground-truth")
    scenarios = scenario_dir(tmp, VOICE_SCENARIO)
    # crosstalk's agents on "a real model" at the recording endpoint: the scripted model's name, offline speech
    with running_stack(tmp, OPENAI_BASE_URL=llm.base_url, CROSSTALK_MODEL_NAME="crosstalk-scripted",
                       CROSSTALK_SPEECH="offline", CROSSTALK_VAD_MIN_SILENCE_S=str(VAD_MIN_SILENCE_S),
                       CROSSTALK_JOIN_DEADLINE_S="60", CROSSTALK_TARGET_JOIN_S="30",
                       CROSSTALK_TARGET_REPLY_S="45", CROSSTALK_SCENARIO_DIR=str(scenarios)) as s:
        llm.upstream = f"http://127.0.0.1:{s.config().model_port}/v1"
        yield s


class Agent:
    """The example agent's worker with a reply delay, its state log and its model at the recording endpoint."""

    def __init__(self, stack: Any, llm: RecordingLLM, tmp: Path, delay_s: float) -> None:
        self.delay_s = delay_s
        self.states = tmp / f"states-{delay_s:g}.jsonl"
        self.target: Target = voice_target(stack, tmp, f"acme-gt-{str(delay_s).replace('.', '-')}",
                                           OPENAI_BASE_URL=llm.base_url, ACME_REPLY_DELAY_S=str(delay_s),
                                           ACME_STATE_LOG=str(self.states))

    def state_events(self, room: str) -> list[dict[str, Any]]:
        lines = self.states.read_text(encoding="utf-8").splitlines() if self.states.exists() else []
        return [e for e in map(json.loads, lines) if e["room"] == room]


@pytest.fixture(scope="module")
def agents(stack: Any, llm: RecordingLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[float, Agent]]:
    tmp = tmp_path_factory.mktemp("agents")
    made = {d: Agent(stack, llm, tmp, d) for d in (0.0, DELAY_S)}
    yield made
    for a in made.values():
        a.target.stop()


class Run:
    """A finished voice batch against one agent: its batch.json, turn lines and window in time."""

    def __init__(self, stack: Any, bid: str, doc: dict[str, Any], started: float, ended: float) -> None:
        self.bid, self.doc, self.started, self.ended = bid, doc, started, ended
        folder = stack.data_dir / "batches" / bid
        self.turns = {cid: read_lines(folder / "conversations" / f"{cid}.jsonl") for cid in doc["conversations"]}

    def room(self, cid: str) -> str:
        return room_name(cid, self.doc["conversations"][cid]["attempts"])


_runs: dict[tuple[str, int, str], Run] = {}  # (agent, concurrency, mode) -> its run, shared by the tests


async def run(stack: Any, agent_name: str | None, concurrency: int, conversations: int, mode: str = "voice") -> Run:
    key = (agent_name or "crosstalk", concurrency, mode)
    if key not in _runs:
        bid = f"gt-{mode}-{key[0]}-c{concurrency}-{int(time.time())}"
        body: dict[str, Any] = {"batch_id": bid, "conversations": conversations, "concurrency": concurrency,
                                "mode": mode, "scenario": VOICE_SCENARIO["id"], "max_turns": MAX_TURNS}
        if agent_name is not None:
            body["target_agent"] = agent_name
        started = time.time()
        batch = await run_batch(stack, body, timeout=400)
        ended = time.time()
        assert (batch["status"], batch["completed"], batch["failed"]) == ("completed", conversations, 0), batch
        doc = read_final(stack.data_dir / "batches" / bid, conversations) if mode == "voice" else batch
        _runs[key] = Run(stack, bid, doc, started, ended)
    return _runs[key]


# -- 1. latency ---------------------------------------------------------------------------------


def agent_view(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Every reply as the agent logged it: (end of the caller's speech before it, start of the reply), wall times.

    End of speech: the last ``user_state_changed`` speaking -> listening before the reply; start:
    ``agent_state_changed`` -> speaking. (Under load the caller's speech may pause long enough for the
    agent to answer twice, the second time with no new speech: both replies are listed.)"""
    out: list[tuple[float, float]] = []
    user_end: float | None = None
    for e in events:
        if e["event"] == "user_state_changed" and (e["old"], e["new"]) == ("speaking", "listening"):
            user_end = e["at"]
        elif e["event"] == "agent_state_changed" and e["new"] == "speaking" and user_end is not None:
            out.append((user_end, e["at"]))
    return out


MATCH_S = 2.0  # a target turn is the agent's reply whose logged start lies this close to where crosstalk heard it


def latencies(agent: Agent, r: Run) -> list[dict[str, float]]:
    """Per target turn answering a customer turn: crosstalk's latency, the agent's, and (on the wall clock,
    crosstalk's recording placed at its origin) where each edge lies in crosstalk's view against the agent's.

    A target turn is paired with the agent's logged reply that starts nearest to where crosstalk heard it
    start, not by count: an agent may answer one caller turn twice."""
    out = []
    for cid, turns in r.turns.items():
        conv = r.doc["conversations"][cid]
        assert [t["turn"] for t in turns] == list(range(len(turns))) and len(turns) >= 4, turns
        view = agent_view(agent.state_events(r.room(cid)))
        # the recording's time zero on the wall clock (batch.json: time to first audio from turn 0's start)
        origin = turns[0]["started_at"] + conv["voice"]["time_to_first_audio_s"]
        heard = conv["voice"]["heard_latency_s"]  # batch.json: turn n's start - turn n-1's end, at n-1
        answers = [(turns[i - 1], t) for i, t in enumerate(turns)
                   if t["role"] == "support" and i > 0 and turns[i - 1]["role"] == "customer"]
        assert answers, turns
        for asked, answer in answers:
            user_end, speaking_at = min(view, key=lambda v: abs(origin + answer["audio_start_s"] - v[1]))
            assert abs(origin + answer["audio_start_s"] - speaking_at) < MATCH_S, (answer, view)
            ours = answer["audio_start_s"] - asked["audio_end_s"]
            # crosstalk's own figure is the one batch.json reports
            assert heard[answer["turn"] - 1] == pytest.approx(ours, abs=0.002), (heard, answer)
            out.append({"crosstalk": ours, "agent": speaking_at - user_end, "offset": ours - (speaking_at - user_end),
                        "end_edge": origin + asked["audio_end_s"] - user_end,
                        "start_edge": origin + answer["audio_start_s"] - speaking_at})
    return out


_offsets: dict[int, dict[float, float]] = {}  # concurrency -> delay -> median offset


def med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


UNDER_LOAD = (
    "at concurrency 3 on this 2-core machine (shared with other test runs, load average 8-14) crosstalk's "
    "offset from the agent's own log jitters per turn (0.86-2.1 s, against 0.76-0.91 s at concurrency 1 on a "
    "quieter machine) and its median moves with load; all of the movement is at the reply's start (crosstalk "
    "hears the target's first loud audio 0.17-0.44 s after the agent logs 'speaking', against 0.11-0.13 s at "
    "concurrency 1), none at the end of the caller's speech (-0.69..-0.78 s throughout). Measured in four "
    "runs at concurrency 3: crosstalk's shift 1.290 s vs the agent's 1.295 (offsets 1.053/1.166 s: pass), "
    "2.290 vs 2.588 (1.104/1.142), 1.879 vs 1.673 (0.935/1.182), 1.589 vs 1.591 (0.832/0.988: pass). Not "
    "strict: it passes on a quieter machine")


@pytest.mark.parametrize("concurrency", [
    pytest.param(1, id="c1"),
    pytest.param(3, id="c3", marks=pytest.mark.xfail(strict=False, raises=AssertionError, reason=UNDER_LOAD)),
])
async def test_crosstalk_sees_the_agents_reply_delay_as_the_agent_logged_it(
        stack: Any, agents: dict[float, Agent], concurrency: int) -> None:
    rows = {}
    for delay, agent in agents.items():
        r = await run(stack, agent.target.name, concurrency, RUNS[concurrency])
        rows[delay] = latencies(agent, r)
    fast, slow = rows[0.0], rows[DELAY_S]
    shift_ours, shift_agent = med(slow, "crosstalk") - med(fast, "crosstalk"), med(slow, "agent") - med(fast, "agent")
    figures = {
        "concurrency": concurrency, "turns": {d: len(v) for d, v in rows.items()},
        **{f"{k}_median_s": {d: round(med(v, k), 3) for d, v in rows.items()}
           for k in ("crosstalk", "agent", "offset", "end_edge", "start_edge")},
        "shift_crosstalk_s": round(shift_ours, 3), "shift_agent_s": round(shift_agent, 3),
        "per_turn": {d: [{k: round(x, 3) for k, x in row.items()} for row in v] for d, v in rows.items()},
    }
    print("ground truth:", json.dumps(figures))
    _offsets[concurrency] = {d: med(v, "offset") for d, v in rows.items()}
    if len(_offsets) > 1:  # crosstalk's offset from the agent's view, per load (reported: the "no drift")
        print("offset by concurrency:", json.dumps({c: {d: round(o, 3) for d, o in v.items()} for c, v in _offsets.items()}))
    assert shift_agent > DELAY_S / 3, f"the injected delay never reached the agent's replies: {figures}"
    assert abs(shift_ours - shift_agent) <= TOLERANCE_S, figures
    assert abs(med(slow, "offset") - med(fast, "offset")) <= TOLERANCE_S, figures


# -- 2. context -------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return " ".join(str(content or "").split())


def carried(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The conversation a chat request carries: its user/assistant messages with text, in order."""
    return [(m["role"], _text(m.get("content"))) for m in body.get("messages", [])
            if m.get("role") in ("user", "assistant") and _text(m.get("content"))]


def expected(turns: list[dict[str, Any]], side: str, voice: bool) -> list[tuple[str, str]]:
    """The conversation as ``side`` should carry it: its own turns' words as assistant, the peer's as user,
    as it heard them."""
    out = []
    for t in turns:
        mine = t["role"] == side
        heard = t["text"] if mine or not voice else t.get("heard_text")
        assert heard is not None, f"turn {t['turn']} has no heard_text: {t}"
        out.append(("assistant" if mine else "user", _text(heard)))
    return out


def check_context(side: str, requests: list[list[tuple[str, str]]],
                  transcripts: dict[str, list[dict[str, Any]]], voice: bool) -> list[str]:
    """Every request a prefix of one conversation's transcript (as ``side`` heard it), and each turn of
    ``side`` asked for with everything before it. Returns the problems found."""
    problems = []
    wanted = {cid: expected(turns, side, voice) for cid, turns in transcripts.items()}
    for i, msgs in enumerate(requests):
        if not any(msgs == w[: len(msgs)] for w in wanted.values()):
            problems.append(f"{side} request {i} carries no conversation's turns in order: {msgs} "
                            f"(closest transcript: {max(wanted.values(), key=lambda w: _common(msgs, w))})")
    for cid, turns in transcripts.items():
        for t in turns:
            if t["role"] == side and wanted[cid][: t["turn"]] not in requests:
                problems.append(f"{cid} turn {t['turn']} ({side}): no request carried the {t['turn']} turns before "
                                f"it: {wanted[cid][: t['turn']]}")
    return problems


def _common(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def requests_of(llm: RecordingLLM, r: Run) -> dict[str, list[list[tuple[str, str]]]]:
    """The run's chat requests by side: crosstalk's worker names its conversation (a header); the example
    agent does not, so its requests are the ones sent during the run without one."""
    out: dict[str, list[list[tuple[str, str]]]] = {"customer": [], "support": []}
    for req in llm.requests():
        conv = req["headers"].get("X-Crosstalk-Conversation", "")
        body = req["body"] or {}
        if conv.startswith(f"{r.bid}/"):
            system = " ".join(_text(m.get("content")) for m in body.get("messages", []) if m.get("role") == "system")
            out["support" if "role=support" in system else "customer"].append(carried(body))
        elif not conv and r.started <= req["at"] <= r.ended and "tools" not in body:
            out["support"].append(carried(body))
    return out


def spoken_in_parts(stack: Any, r: Run) -> dict[str, int]:
    """Per role, how many turns hold a pause of PAUSE_S or more on the speaker's channel of the
    recording: turns crosstalk's listener heard in several STT segments."""
    out = {"customer": 0, "support": 0}
    win_s = 0.02
    for cid, turns in r.turns.items():
        stereo, rate = read_recording(stack.data_dir / "batches" / r.bid / "recordings" / f"{cid}.wav")
        win = int(rate * win_s)
        for t in turns:
            x = stereo[int(t["audio_start_s"] * rate): int(t["audio_end_s"] * rate),
                       0 if t["role"] == "customer" else 1].astype(np.float64)
            loud = np.sqrt((x[: len(x) // win * win].reshape(-1, win) ** 2).mean(axis=1)) >= voice.SPEECH_RMS
            longest = quiet = 0
            for v in loud:
                quiet = 0 if v else quiet + 1
                longest = max(longest, quiet)
            out[t["role"]] += longest * win_s >= PAUSE_S
    return out


@pytest.mark.parametrize(("against", "mode"), [
    pytest.param("target", "text", id="example-agent-text"),
    pytest.param("target", "voice", id="example-agent-voice"),
    pytest.param("crosstalk", "text", id="crosstalk-pair-text"),
    # (crosstalk's own listener asked its model with a turn's last STT segment only until 9fb860a)
    pytest.param("crosstalk", "voice", id="crosstalk-pair-voice"),
])
async def test_every_model_request_carries_the_whole_conversation(
        stack: Any, llm: RecordingLLM, agents: dict[float, Agent], against: str, mode: str) -> None:
    target = agents[0.0].target.name if against == "target" else None
    # voice against the agent: the latency test's run without delay (the same batch, when it ran first)
    concurrency, conversations = (2, 2) if mode == "text" else (1, RUNS[1]) if target else (1, 1)
    r = await run(stack, target, concurrency, conversations, mode)
    reqs = requests_of(llm, r)
    parts = spoken_in_parts(stack, r) if mode == "voice" else None
    print(f"{against} {mode}: requests", {k: len(v) for k, v in reqs.items()}, "turns spoken in parts:", parts)
    if parts is not None and against == "crosstalk":
        assert sum(parts.values()) > 0, "no turn had a pause crosstalk's VAD cuts at: nothing was heard in parts"
    problems = check_context("customer", reqs["customer"], r.turns, mode == "voice")
    problems += check_context("support", reqs["support"], r.turns, mode == "voice")
    assert not problems, "\n".join(problems)
