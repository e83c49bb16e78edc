"""``python -m services.judge``: judge every finished batch (see services/judge/main.py).

Configuration: the common variables (NATS_URL, CROSSTALK_DATA_DIR, ...) and the judge's own
(``CROSSTALK_JUDGE_URL``, ``CROSSTALK_JUDGE_MODEL``, ``CROSSTALK_JUDGE_API_KEY``, ``CROSSTALK_JUDGE_WAIT_S``).
"""

from __future__ import annotations

import asyncio
import sys

from shared import bus
from shared.config import load_or_exit
from shared.log import kv, setup
from shared.metrics import JudgeMetrics, serve

from .batch import JudgeConfig
from .main import Judge


def main() -> None:
    log = setup("judge")
    settings = load_or_exit(log)
    try:
        config = JudgeConfig.from_env()
    except ValueError as exc:
        log.error("bad configuration", extra=kv(reason=str(exc)))
        sys.exit(2)

    async def run(stop: asyncio.Event) -> None:
        port = serve("judge", settings.metrics_host, settings.metrics_port)
        nc = await bus.connect(settings.nats_url, "crosstalk-judge")
        try:
            js = await bus.jetstream(nc)
            log.info("judge consuming", extra=kv(data_dir=str(settings.data_dir), llm_judge=config.url is not None,
                                                 judge_model=config.model if config.url else None, metrics_port=port))
            await Judge(js, settings, config, JudgeMetrics()).run(stop)
        finally:
            await nc.drain()

    bus.run(run)


if __name__ == "__main__":
    main()
