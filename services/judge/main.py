"""The judge service's loop: batch events in, plan.json and judgments out.

A durable consumer (``judge``) on ``BATCH_EVENTS``: a ``BatchAccepted`` writes the batch's
``plan.json`` (its spec with the scenarios it runs); a ``BatchFinished`` waits until the sink
has written the batch (its batch.json finished, every completed transcript complete), then
judges every conversation (services/judge/batch.py; a judge-model failure is retried once), writes
``judged.json`` and publishes ``BatchJudged`` (counts per verdict) on the batch's event subject:
``crosstalk report`` and ``crosstalk test`` wait for it. A message is acked only once its files
are written and the event published, so a judge that dies mid-batch judges the rest after a
restart; what was already judged is skipped. A batch the sink never finishes is judged anyway
after ``wait_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, contracts, scenarios, streams, subjects
from shared.config import Settings
from shared.contracts import BatchAccepted, BatchEvent, BatchFinished
from shared.log import kv
from shared.metrics import JudgeMetrics

from .batch import JudgeConfig, judge_to_the_end, ready
from .llm import LlmJudge
from .store import BatchFiles

log = logging.getLogger("judge")

CONSUMER = streams.Durable(str(streams.BATCH_EVENTS.name),
                           streams.durable("judge", [subjects.BATCH_EVENTS_ALL], ack_wait=300.0, max_ack_pending=64))
RETRY_S = 2.0


class Judge:
    def __init__(self, js: JetStreamContext, settings: Settings, config: JudgeConfig, metrics: JudgeMetrics) -> None:
        self.js = js
        self.metrics = metrics
        self.settings = settings
        self.config = config
        self.llm: LlmJudge | None = config.make_llm()
        self.waiting_since: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        sub = await streams.bind(self.js, CONSUMER)
        while not stop.is_set():
            for msg in await bus.fetch(sub, 16):
                await self.handle(msg)
        if self.llm is not None:
            await self.llm.aclose()

    async def handle(self, msg: Msg) -> None:
        try:
            event = contracts.decode_event(msg.data, BatchEvent)
        except contracts.ContractError as exc:
            log.warning("undecodable batch event skipped", extra=kv(subject=msg.subject, field=exc.field,
                                                                    reason=exc.reason))
            await bus.ack([msg])
            return
        try:
            if isinstance(event, BatchAccepted):
                files = BatchFiles(self.settings.data_dir, event.spec.batch_id)
                await asyncio.to_thread(files.write_plan, event.spec)
            elif isinstance(event, BatchFinished) and not await self.finished(event, msg):
                await bus.nak([msg], delay=RETRY_S)
                return
        except contracts.ContractError as exc:
            log.warning("batch event with a bad id skipped", extra=kv(field=exc.field, reason=exc.reason))
        except Exception:
            log.exception("judging failed; will retry", extra=kv(subject=msg.subject))
            await bus.nak([msg], delay=10.0)
            return
        await bus.ack([msg])

    async def finished(self, ev: BatchFinished, msg: Msg) -> bool:
        """Judge the batch once the sink's files are complete; False: not yet (the event comes back)."""
        files = BatchFiles(self.settings.data_dir, ev.batch_id)
        missing = await asyncio.to_thread(ready, files)
        first = self.waiting_since.setdefault(ev.batch_id, time.monotonic())
        if missing is not None and time.monotonic() - first < self.config.wait_s:
            return False
        if missing is not None:
            log.warning("judging a batch the sink has not completed", extra=kv(batch_id=ev.batch_id, missing=missing))
        self.waiting_since.pop(ev.batch_id, None)
        started = time.monotonic()
        async def still_working() -> None:  # a long batch must not be redelivered while it is judged
            with contextlib.suppress(Exception):
                await msg.in_progress()

        written, judged = await judge_to_the_end(files, scenarios.library(), self.llm, progress=still_working)
        if judged is not None:
            digest = ",".join(f"{k}={v}" for k, v in sorted(judged.verdicts.items()))
            await bus.publish(self.js, subjects.batch_events(ev.batch_id), judged,
                              msg_id=f"{ev.batch_id}-judged-{digest}-{judged.judge_errors}")
            log.info("batch judged", extra=kv(batch_id=ev.batch_id, **judged.verdicts, not_judged=judged.not_judged,
                                              judge_errors=judged.judge_errors))
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        for j in written:
            self.metrics.judgments.labels(j.verdict or "infra_failure").inc()
        return True
