"""Prometheus metrics: every name crosstalk exports, grouped per process.

A process registers only its own group (``DispatcherMetrics()``, ...), so a
sum across all scrape targets never double counts. Labels are bounded: never
a room, batch or conversation id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import product
from typing import Any, Generic, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

# Default /metrics ports (CROSSTALK_METRICS_PORT overrides per process).
DEFAULT_PORTS = {
    "dispatcher": 9101, "allocator": 9102, "sink": 9103, "model": 9104, "worker": 9105, "webhook": 9120,
    "speech": 9106, "llm": 9107,
    "judge": 9130,
}

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
JOIN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120)

# Bounded failure reasons (the free-text reason stays in events and batch.json).
REASONS = (
    "end_conversation",
    "max_turns",
    "join_timeout",
    "agent_left",
    "agent_error",
    "role_denied",
    "conversation_timeout",
    "dispatch_error",
    "no_capacity",
    "lease_lost",
    "target_no_show",
    "target_silent",
    "target_unresponsive",
    "target_left",
    "no_audio",  # voice: a listener heard no speech at all (crosstalk's fault: retried)
    "recording_missing",  # voice: no recording of the settled attempt reached the sink
    "other",
)


LIVEKIT_CALLS = ("create_room", "create_dispatch", "delete_room", "list_dispatch", "list_participants", "list_rooms")
ROLE_LABELS = ("customer", "support")


def reason_label(reason: str) -> str:
    head = reason.split(":", 1)[0]
    return head if head in REASONS else "other"


M = TypeVar("M", Counter, Gauge, Histogram)


class Metric(Generic[M]):
    """One metric of a group, as a row of its table: kind, name, help, labels, buckets, label values at 0.

    Known label values start at 0 (``zero``), so the first event of a run shows up in
    rate()/increase(). The group's ``__init__`` builds each row on its registry into the
    instance, where the built metric shadows this declaration.
    """

    def __init__(self, kind: type[M], name: str, doc: str, labels: tuple[str, ...] = (), *,
                 buckets: Sequence[float] | None = None, zero: Iterable[tuple[str, ...]] = ()) -> None:
        self.kind: type[M] = kind
        self.name, self.doc, self.labels = name, doc, labels
        self.buckets, self.zero = buckets, tuple(zero)

    def __get__(self, group: object, owner: type | None = None) -> M:
        raise AttributeError(f"{self.name}: a metric exists on a group instance (its registry), not on the class")

    def build(self, registry: CollectorRegistry) -> M:
        extra: dict[str, Any] = {} if self.buckets is None else {"buckets": self.buckets}
        metric = self.kind(self.name, self.doc, self.labels, registry=registry, **extra)
        for values in self.zero:
            metric.labels(*values)
        return metric


class MetricGroup:
    """One process's metrics: every :class:`Metric` row of the class, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        for attr, row in vars(type(self)).items():
            if isinstance(row, Metric):
                self.__dict__[attr] = row.build(registry)


def each(*values: str) -> list[tuple[str, ...]]:
    """Label values of a one-label metric, as ``Metric(zero=...)`` takes them."""
    return [(v,) for v in values]


class DispatcherMetrics(MetricGroup):
    batch_commands = Metric(Counter, "crosstalk_batch_commands_total", "batch.start commands by outcome",
                            ("outcome",), zero=each("accepted", "rejected", "duplicate"))
    batches = Metric(Counter, "crosstalk_batches_total", "finished batches by outcome", ("outcome",),
                     zero=each("completed", "failed"))
    batches_running = Metric(Gauge, "crosstalk_batches_running", "batches accepted and not finished")
    conversations = Metric(Counter, "crosstalk_conversations_total", "settled conversations by outcome and reason",
                           ("outcome", "reason"), zero=product(("completed", "failed"), REASONS))
    attempts = Metric(Counter, "crosstalk_conversation_attempts_total",
                      "conversation attempts dispatched (retries included)")
    retries = Metric(Counter, "crosstalk_conversation_retries_total", "attempts retried by reason", ("reason",),
                     zero=each(*REASONS))
    in_flight = Metric(Gauge, "crosstalk_conversations_in_flight", "conversations dispatched and not settled")
    pending = Metric(Gauge, "crosstalk_conversations_pending", "conversations waiting for an admission slot")
    queued = Metric(Gauge, "crosstalk_dispatcher_queued",
                    "conversations their batch's concurrency would run now, waiting for worker capacity")
    workers = Metric(Gauge, "crosstalk_dispatcher_workers", "live workers (heartbeat within the expiry)")
    capacity = Metric(Gauge, "crosstalk_dispatcher_capacity_sessions", "agent sessions the live workers announce")
    free = Metric(Gauge, "crosstalk_dispatcher_free_sessions", "agent sessions free on live workers, as announced")
    reserved = Metric(Gauge, "crosstalk_dispatcher_reserved_sessions",
                      "sessions of admitted conversations not yet on a worker")
    dispatch_to_join = Metric(Histogram, "crosstalk_dispatch_to_join_seconds",
                              "room creation to both agents joined with roles", buckets=JOIN_BUCKETS)
    livekit_api = Metric(Histogram, "crosstalk_livekit_api_seconds", "livekit-api call latency", ("call",),
                         buckets=LATENCY_BUCKETS, zero=each(*LIVEKIT_CALLS))
    livekit_api_errors = Metric(Counter, "crosstalk_livekit_api_errors_total", "livekit-api call failures",
                                ("call",), zero=each(*LIVEKIT_CALLS))


class AllocatorMetrics(MetricGroup):
    grants = Metric(Counter, "crosstalk_role_grants_total", "role requests by role and outcome", ("role", "outcome"),
                    zero=[*product(ROLE_LABELS, ("granted", "renewed")), ("none", "denied"), ("none", "error")])
    request_seconds = Metric(Histogram, "crosstalk_role_request_seconds", "role.request handling latency",
                             buckets=LATENCY_BUCKETS)
    lease_expiries = Metric(Counter, "crosstalk_role_lease_expiries_total",
                            "expired leases taken over by a new job", ("role",), zero=each(*ROLE_LABELS))
    releases = Metric(Counter, "crosstalk_role_releases_total", "role.release by outcome", ("outcome",),
                      zero=each("released", "not_held", "error"))
    conflicts = Metric(Counter, "crosstalk_role_write_conflicts_total", "optimistic-concurrency conflicts retried")
    bad_requests = Metric(Counter, "crosstalk_role_bad_requests_total", "malformed role requests", ("field",))
    renewals = Metric(Counter, "crosstalk_role_renewals_total", "role.renew by outcome", ("outcome",),
                      zero=each("renewed", "superseded", "expired", "unknown", "error"))


class SinkMetrics(MetricGroup):
    turns_written = Metric(Counter, "crosstalk_transcript_turns_written_total", "turn lines durably written")
    duplicates = Metric(Counter, "crosstalk_transcript_duplicates_total", "turn events already stored (redeliveries)")
    events = Metric(Counter, "crosstalk_transcript_events_total", "events consumed by kind", ("kind",))
    lag = Metric(Gauge, "crosstalk_sink_lag_messages", "events in the stream not yet acked by the sink")
    write_seconds = Metric(Histogram, "crosstalk_sink_write_seconds", "write+fsync latency per batch of lines",
                           buckets=LATENCY_BUCKETS)
    dropped = Metric(Counter, "crosstalk_sink_dropped_total", "events acked without effect, by reason",
                     ("reason",))  # invalid|stale_attempt
    held = Metric(Gauge, "crosstalk_sink_held_turns", "out-of-order turns buffered until their gap fills")
    turns_refused = Metric(
        Counter, "crosstalk_sink_turns_refused_total",
        "turns never written: their lease was not the live lease of that role in that room at that time",
        ("reason",), zero=each("no_lease", "unknown", "superseded", "released", "expired"))
    conflicts = Metric(Counter, "crosstalk_sink_conflicts_total",
                       "turn events kept out: index already stored with a different text")
    incomplete = Metric(
        Counter, "crosstalk_sink_transcripts_incomplete_total",
        "completed conversations failed as transcript_incomplete (file short when the batch finished)")
    # voice mode, measured on each merged recording (services/sink/core/voice.py; README "Voice metrics")
    voice_recordings = Metric(Counter, "crosstalk_voice_recordings_total", "stereo conversation recordings written")
    voice_heard_latency = Metric(
        Histogram, "crosstalk_voice_heard_latency_seconds",
        "per turn: its speech start minus the previous turn's speech end in the recording (negative: overlap)",
        buckets=(-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0))
    voice_overlap_ratio = Metric(
        Histogram, "crosstalk_voice_overlap_ratio", "per conversation: seconds both speak / seconds anyone speaks",
        buckets=(0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0))
    voice_awkward_silences = Metric(Counter, "crosstalk_voice_awkward_silences_total",
                                    "silences over 3 s between speech")
    voice_unanswered_turns = Metric(Counter, "crosstalk_voice_unanswered_turns_total",
                                    "turns the other side did not answer within 10 s")
    voice_false_interruptions = Metric(Counter, "crosstalk_voice_false_interruptions_total",
                                       "speech starting while the other side speaks that starts no turn")
    voice_time_to_first_audio = Metric(
        Histogram, "crosstalk_voice_time_to_first_audio_seconds",
        "per conversation: first audio in the room minus when the customer's first reply was asked for",
        buckets=LATENCY_BUCKETS)
    voice_stt_wer = Metric(
        Histogram, "crosstalk_voice_stt_wer", "per conversation: word error rate of heard_text against the spoken text",
        buckets=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0))
    voice_turns_heard = Metric(Counter, "crosstalk_voice_turns_heard_total", "voice turns by how the listener heard them",
                               ("via",))  # stt|speaker_text|none


class WorkerMetrics(MetricGroup):
    active_jobs = Metric(Gauge, "crosstalk_worker_active_jobs", "jobs running in this worker")
    capacity = Metric(Gauge, "crosstalk_worker_capacity_sessions", "agent sessions this worker announces")
    peak_active = Metric(Gauge, "crosstalk_worker_peak_active_jobs", "most jobs this worker ran at once")
    load = Metric(Gauge, "crosstalk_worker_load", "load reported to livekit-server (0..1)")
    heartbeat = Metric(Gauge, "crosstalk_worker_heartbeat_timestamp_seconds",
                       "last time the worker's event loop ran (the watchdog reads it)")
    jobs = Metric(Counter, "crosstalk_worker_jobs_total", "jobs by outcome", ("outcome",),
                  zero=each("started", "completed", "failed", "denied", "error", "bad_metadata"))
    turns = Metric(Counter, "crosstalk_turns_total", "turns spoken by role", ("role",), zero=each(*ROLE_LABELS))
    first_token = Metric(Histogram, "crosstalk_turn_first_token_seconds", "peer message received to first model token",
                         ("role",), buckets=LATENCY_BUCKETS, zero=each(*ROLE_LABELS))
    turn_seconds = Metric(Histogram, "crosstalk_turn_seconds", "peer message received to reply sent", ("role",),
                          buckets=LATENCY_BUCKETS, zero=each(*ROLE_LABELS))


class WebhookMetrics(MetricGroup):
    requests = Metric(Counter, "crosstalk_webhook_requests_total", "livekit-server webhook requests by outcome",
                      ("outcome",), zero=each("published", "ignored", "unauthorized", "bad_request", "error"))
    events = Metric(Counter, "crosstalk_webhook_events_total", "verified webhooks published, by event", ("event",),
                    zero=each("room_started", "room_finished", "participant_joined", "participant_left"))
    publish_seconds = Metric(Histogram, "crosstalk_webhook_publish_seconds", "request received to JetStream ack",
                             buckets=LATENCY_BUCKETS)


class JudgeMetrics(MetricGroup):
    """services/judge: verdicts written (infra_failure: no verdict, kept out of pass rates), batches judged."""

    judgments = Metric(Counter, "crosstalk_judge_judgments_total", "conversation judgments written, by verdict",
                       ("verdict",), zero=each("pass", "fail", "inconclusive", "infra_failure"))
    batches = Metric(Counter, "crosstalk_judge_batches_total", "finished batches judged")
    batch_seconds = Metric(Histogram, "crosstalk_judge_batch_seconds",
                           "time to judge one finished batch (checks and LLM judge)", buckets=JOIN_BUCKETS)


class ModelMetrics(MetricGroup):
    requests = Metric(Counter, "crosstalk_model_requests_total", "chat completions served by role", ("role",),
                      zero=each(*ROLE_LABELS))
    request_seconds = Metric(Histogram, "crosstalk_model_request_seconds", "chat completion total time",
                             buckets=LATENCY_BUCKETS)


RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)
SPEECH_ENDPOINTS = ("speech", "transcriptions", "voices")
SPEECH_ENGINES = ("piper", "espeak", "whisper")
SPEECH_OUTCOMES = ("ok", "bad_request", "error", "aborted")  # aborted: the client left


class SpeechMetrics(MetricGroup):
    """services/speech: requests, latency, real-time factor (compute time / audio time) per engine."""

    requests = Metric(Counter, "crosstalk_speech_requests_total", "speech API requests by endpoint and outcome",
                      ("endpoint", "outcome"), zero=product(SPEECH_ENDPOINTS, SPEECH_OUTCOMES))
    request_seconds = Metric(Histogram, "crosstalk_speech_request_seconds", "request received to last byte sent",
                             ("endpoint",), buckets=LATENCY_BUCKETS, zero=each(*SPEECH_ENDPOINTS))
    first_audio = Metric(Histogram, "crosstalk_speech_first_audio_seconds",
                         "speech request received to first audio byte sent", ("engine",), buckets=LATENCY_BUCKETS,
                         zero=each(*(e for e in SPEECH_ENGINES if e != "whisper")))
    rtf = Metric(Histogram, "crosstalk_speech_real_time_factor", "engine compute seconds per second of audio",
                 ("engine",), buckets=RTF_BUCKETS, zero=each(*SPEECH_ENGINES))
    audio_seconds = Metric(Counter, "crosstalk_speech_audio_seconds_total",
                           "seconds of audio synthesised (piper, espeak) or transcribed (whisper)", ("engine",),
                           zero=each(*SPEECH_ENGINES))
    compute_seconds = Metric(Counter, "crosstalk_speech_compute_seconds_total", "engine wall seconds spent",
                             ("engine",), zero=each(*SPEECH_ENGINES))
    busy = Metric(Gauge, "crosstalk_speech_jobs_running", "engine jobs running in the pool")
    waiting = Metric(Gauge, "crosstalk_speech_jobs_waiting", "engine jobs waiting for a pool slot")


LLM_OUTCOMES = ("ok", "bad_request", "busy", "error", "aborted")  # busy: the queue was full; aborted: client left
TOKEN_RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 400)


class LlmMetrics(MetricGroup):
    """services/llm: completions, time to first token (queue wait included), decode rate, queue depth."""

    requests = Metric(Counter, "crosstalk_llm_requests_total", "chat completions by outcome", ("outcome",),
                      zero=each(*LLM_OUTCOMES))
    first_token = Metric(Histogram, "crosstalk_llm_first_token_seconds",
                         "request received to first token generated (queue wait included)", buckets=LATENCY_BUCKETS)
    tokens_per_s = Metric(Histogram, "crosstalk_llm_tokens_per_second", "completion tokens per second of decoding",
                          buckets=TOKEN_RATE_BUCKETS)
    tokens = Metric(Counter, "crosstalk_llm_tokens_total", "tokens by kind", ("kind",),
                    zero=each("prompt", "completion"))
    busy = Metric(Gauge, "crosstalk_llm_slots_busy", "completions being generated (at most CROSSTALK_LLM_SLOTS)")
    waiting = Metric(Gauge, "crosstalk_llm_queue_depth", "completions waiting for a slot")


def serve(process: str, host: str, port: int) -> int:
    """Start the /metrics HTTP server; ``port`` 0 means this process's default."""
    chosen = port or DEFAULT_PORTS[process]
    start_http_server(chosen, addr=host)
    return chosen
