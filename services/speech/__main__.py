"""``python -m services.speech``: offline speech on CROSSTALK_SPEECH_HOST:CROSSTALK_SPEECH_PORT.

The engines load once, before anything is served (a missing package stops start-up with a line
naming it and exit code 3); then /metrics and the HTTP API start and "speech serving" is logged.
Pool size, engine threads and limits come from CROSSTALK_SPEECH_* (shared/config.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: never a download

from shared import bus  # noqa: E402
from shared.config import load_or_exit  # noqa: E402
from shared.log import kv, setup  # noqa: E402
from shared.metrics import SpeechMetrics, serve  # noqa: E402

from .engines import EngineMissing, Engines, Options  # noqa: E402
from .main import Limits, serve_in_background  # noqa: E402


def main() -> None:
    log = setup("speech")
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # it logs every request at INFO
    settings = load_or_exit(log)
    options = Options(tts_threads=settings.speech_tts_threads, stt_threads=settings.speech_stt_threads,
                      workers=settings.speech_workers, beam_size=settings.speech_stt_beam_size,
                      stt_window=settings.speech_stt_window)
    started = time.perf_counter()
    try:
        engines = Engines(options)
        engines.warm_up()
    except EngineMissing as exc:
        log.error("speech engine missing", extra=kv(reason=str(exc)))
        raise SystemExit(3) from None
    log.info("engines loaded", extra=kv(seconds=round(time.perf_counter() - started, 2), options=str(options)))
    metrics = SpeechMetrics()
    limits = Limits(settings.speech_max_input_chars, settings.speech_max_upload_mb)

    async def run(stop: asyncio.Event) -> None:
        metrics_port = serve("speech", settings.metrics_host, settings.metrics_port)
        async with serve_in_background(engines, settings.speech_host, settings.speech_port, metrics=metrics,
                                       limits=limits) as url:
            log.info("speech serving", extra=kv(url=url, metrics_port=metrics_port))
            await stop.wait()
        log.info("speech stopped")

    bus.run(run)


if __name__ == "__main__":
    main()
