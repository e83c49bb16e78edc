"""10 000 turns, duplicated and reordered, into a sink process SIGKILLed twice while it consumes.

The sink runs as its own OS process (``python -m services.sink``) against the real
nats-server. At the end every transcript file must be byte for byte the turns of its
conversation, each once and in order, and the durable consumer must have nothing
left unacked.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from nats.js.errors import NotFoundError
from support.harness import Procs
from support.leases import Leases

from services.sink import core
from shared import bus, streams, subjects
from shared.contracts import TurnRecorded

CONVERSATIONS = 200
TURNS = 50
HINDI = [
    "नमस्ते, मैं आपके खाते के बारे में मदद चाहता हूँ।",
    "ज़रूर! कृपया अपना पंजीकृत मोबाइल नंबर बताइए।",
    "मेरा पासवर्ड काम नहीं कर रहा है, ओटीपी भी नहीं आ रहा।",
    "धन्यवाद, आपकी समस्या हल हो गई है। 🙏",
]
HINGLISH = ["Mera refund abhi tak नहीं आया, kab tak aayega?", "Aapka refund 3-5 din mein aa jayega ji."]
ENGLISH = ['Hello, I need help with my account "billing" page.', "Line one\nline two \\ with a backslash\ttab."]


def script(batch: str) -> dict[str, list[TurnRecorded]]:
    convs: dict[str, list[TurnRecorded]] = {}
    for i in range(CONVERSATIONS):
        conv = f"conv-{i:03d}"
        pool = (HINDI, HINGLISH, ENGLISH)[i % 3]
        convs[conv] = [
            TurnRecorded(
                batch_id=batch, conversation_id=conv, attempt=1, turn=n,
                role="customer" if n % 2 == 0 else "support",
                text=f"{pool[n % len(pool)]} [{i}:{n}]",
                started_at=1_700_000_000.0 + i + n / 100, ended_at=1_700_000_000.5 + i + n / 100,
                first_token_s=0.05 + n / 1000, total_s=0.3, language=("hi", "hi", "en")[i % 3],
            )
            for n in range(TURNS)
        ]
    return convs


def publish_order(convs: dict[str, list[TurnRecorded]], rng: random.Random) -> list[TurnRecorded]:
    """Conversations interleaved, turns displaced by up to a few hundred places, ~8% sent twice."""
    queues = {c: list(ts) for c, ts in convs.items()}
    live = list(queues)
    interleaved: list[TurnRecorded] = []
    while live:
        c = rng.choice(live)
        interleaved.append(queues[c].pop(0))
        if not queues[c]:
            live.remove(c)
    keyed = [(i + rng.uniform(0, 400), t) for i, t in enumerate(interleaved)]
    keyed += [(k + rng.uniform(-1500, 3000), t) for k, t in keyed if rng.random() < 0.08]
    keyed.sort(key=lambda kt: kt[0])
    return [t for _, t in keyed]


def count_lines(conv_dir: Path) -> int:
    if not conv_dir.exists():
        return 0
    return sum(p.read_bytes().count(b"\n") for p in conv_dir.glob("*.jsonl"))


def listing(conv_dir: Path) -> list[str]:
    return sorted(os.listdir(conv_dir))


async def test_ten_thousand_turns_survive_duplicates_reordering_and_two_sigkills(
    nats_url: str, tmp_path: Path, unique: str
) -> None:
    batch = f"crash-{unique}"
    durable = f"sink-{unique}"
    data = tmp_path / "data"
    conv_dir = data / "batches" / batch / "conversations"
    procs = Procs(tmp_path, nats_url)
    env = {
        "CROSSTALK_DATA_DIR": str(data),
        "CROSSTALK_SINK_DURABLE": durable,
        "CROSSTALK_SINK_DELIVER": "new",
        "CROSSTALK_SINK_ACK_WAIT_S": "3",
    }

    convs = script(batch)
    order = publish_order(convs, random.Random(unique))
    assert len(order) > CONVERSATIONS * TURNS  # duplicates included

    nc = await bus.connect(nats_url, "test-crash-publisher")
    js = await bus.jetstream(nc)
    leases = Leases()  # every turn under a live lease of its role (the sink stores no other)
    order = [await leases.leased(js, t) for t in order]
    try:
        sink = procs.sink(**env)
        for _ in range(300):  # the sink creates its durable consumers (deliver: new) at start
            try:
                await js.consumer_info(streams.CONVERSATIONS.name, f"{durable}-conv")
                break
            except NotFoundError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("sink never created its consumer: " + sink.log()[-2000:])

        async def publish_all() -> None:
            # Paced, so that the kills below land while turns are still arriving.
            for start in range(0, len(order), 250):
                await asyncio.gather(*(
                    bus.publish(js, subjects.conv_event(t.batch_id, t.conversation_id, "turn"), t)
                    for t in order[start:start + 250]
                ))
                await asyncio.sleep(0.1)

        publishing = asyncio.create_task(publish_all())
        kills = []
        for threshold in (2500, 6000):
            for _ in range(15000):
                lines = await asyncio.to_thread(count_lines, conv_dir)
                if lines >= threshold:
                    break
                assert sink.alive(), "sink died: " + sink.log()[-2000:]
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"sink stuck below {threshold} lines")
            await asyncio.to_thread(sink.kill)
            kills.append(await asyncio.to_thread(count_lines, conv_dir))
            sink.start()
        await publishing
        assert all(n < CONVERSATIONS * TURNS for n in kills), kills  # killed while consuming

        async def done() -> bool:
            conv = await js.consumer_info(streams.CONVERSATIONS.name, f"{durable}-conv")
            if conv.num_pending or conv.num_ack_pending:
                return False
            return await asyncio.to_thread(count_lines, conv_dir) >= CONVERSATIONS * TURNS

        for _ in range(1200):
            if await done():
                break
            assert sink.alive(), "sink died: " + sink.log()[-2000:]
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("sink never caught up: " + sink.log()[-2000:])

        assert await asyncio.to_thread(sink.metric, "crosstalk_transcript_duplicates_total") > 0
        assert await asyncio.to_thread(sink.metric, "crosstalk_sink_held_turns") == 0

        await asyncio.to_thread(sink.stop, 30)
        assert sink.returncode == 0
    finally:
        procs.stop_all()
        await nc.drain()

    assert listing(conv_dir) == sorted(f"{c}.jsonl" for c in convs)
    for conv, turns in convs.items():
        expected = b"".join(core.encode_line(t) for t in turns)
        got = await asyncio.to_thread((conv_dir / f"{conv}.jsonl").read_bytes)
        assert got == expected, conv  # each turn once, in order, every byte as sent
    assert HINDI[2].encode("utf-8") in await asyncio.to_thread((conv_dir / "conv-000.jsonl").read_bytes)
