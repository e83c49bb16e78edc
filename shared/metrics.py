"""Prometheus metrics: every name crosstalk exports, grouped per process.

A process registers only its own group (``DispatcherMetrics()``, ...), so a
sum across all scrape targets never double counts. Labels are bounded: never
a room, batch or conversation id.
"""

from __future__ import annotations

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
    "speech": 9106,
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
    "other",
)


LIVEKIT_CALLS = ("create_room", "create_dispatch", "delete_room", "list_dispatch", "list_participants", "list_rooms")
ROLE_LABELS = ("customer", "support")


def reason_label(reason: str) -> str:
    head = reason.split(":", 1)[0]
    return head if head in REASONS else "other"


class DispatcherMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.batch_commands = Counter(
            "crosstalk_batch_commands_total", "batch.start commands by outcome",
            ["outcome"], registry=registry)  # accepted|rejected|duplicate
        self.batches = Counter(
            "crosstalk_batches_total", "finished batches by outcome", ["outcome"], registry=registry)
        self.batches_running = Gauge(
            "crosstalk_batches_running", "batches accepted and not finished", registry=registry)
        self.conversations = Counter(
            "crosstalk_conversations_total", "settled conversations by outcome and reason",
            ["outcome", "reason"], registry=registry)
        self.attempts = Counter(
            "crosstalk_conversation_attempts_total", "conversation attempts dispatched (retries included)",
            registry=registry)
        self.retries = Counter(
            "crosstalk_conversation_retries_total", "attempts retried by reason", ["reason"], registry=registry)
        self.in_flight = Gauge(
            "crosstalk_conversations_in_flight", "conversations dispatched and not settled", registry=registry)
        self.pending = Gauge(
            "crosstalk_conversations_pending", "conversations waiting for an admission slot", registry=registry)
        self.queued = Gauge(
            "crosstalk_dispatcher_queued", "conversations their batch's concurrency would run now, waiting for "
            "worker capacity", registry=registry)
        self.workers = Gauge(
            "crosstalk_dispatcher_workers", "live workers (heartbeat within the expiry)", registry=registry)
        self.capacity = Gauge(
            "crosstalk_dispatcher_capacity_sessions", "agent sessions the live workers announce",
            registry=registry)
        self.free = Gauge(
            "crosstalk_dispatcher_free_sessions", "agent sessions free on live workers, as announced",
            registry=registry)
        self.reserved = Gauge(
            "crosstalk_dispatcher_reserved_sessions", "sessions of admitted conversations not yet on a worker",
            registry=registry)
        self.dispatch_to_join = Histogram(
            "crosstalk_dispatch_to_join_seconds", "room creation to both agents joined with roles",
            buckets=JOIN_BUCKETS, registry=registry)
        self.livekit_api = Histogram(
            "crosstalk_livekit_api_seconds", "livekit-api call latency", ["call"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.livekit_api_errors = Counter(
            "crosstalk_livekit_api_errors_total", "livekit-api call failures", ["call"], registry=registry)
        # Known label values start at 0, so the first event of a run shows up in rate()/increase().
        for outcome in ("accepted", "rejected", "duplicate"):
            self.batch_commands.labels(outcome)
        for outcome in ("completed", "failed"):
            self.batches.labels(outcome)
            for reason in REASONS:
                self.conversations.labels(outcome, reason)
        for reason in REASONS:
            self.retries.labels(reason)
        for call in LIVEKIT_CALLS:
            self.livekit_api.labels(call)
            self.livekit_api_errors.labels(call)


class AllocatorMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.grants = Counter(
            "crosstalk_role_grants_total", "role requests by role and outcome",
            ["role", "outcome"], registry=registry)  # outcome: granted|renewed|denied|error
        self.request_seconds = Histogram(
            "crosstalk_role_request_seconds", "role.request handling latency",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.lease_expiries = Counter(
            "crosstalk_role_lease_expiries_total", "expired leases taken over by a new job",
            ["role"], registry=registry)
        self.releases = Counter(
            "crosstalk_role_releases_total", "role.release by outcome", ["outcome"], registry=registry)
        self.conflicts = Counter(
            "crosstalk_role_write_conflicts_total", "optimistic-concurrency conflicts retried",
            registry=registry)
        self.bad_requests = Counter(
            "crosstalk_role_bad_requests_total", "malformed role requests", ["field"], registry=registry)
        self.renewals = Counter(
            "crosstalk_role_renewals_total", "role.renew by outcome", ["outcome"],
            registry=registry)  # renewed|superseded|expired|unknown|error
        for role in ROLE_LABELS:
            for outcome in ("granted", "renewed"):
                self.grants.labels(role, outcome)
            self.lease_expiries.labels(role)
        self.grants.labels("none", "denied")
        self.grants.labels("none", "error")
        for outcome in ("released", "not_held", "error"):
            self.releases.labels(outcome)
        for outcome in ("renewed", "superseded", "expired", "unknown", "error"):
            self.renewals.labels(outcome)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.turns_written = Counter(
            "crosstalk_transcript_turns_written_total", "turn lines durably written", registry=registry)
        self.duplicates = Counter(
            "crosstalk_transcript_duplicates_total", "turn events already stored (redeliveries)",
            registry=registry)
        self.events = Counter(
            "crosstalk_transcript_events_total", "events consumed by kind", ["kind"], registry=registry)
        self.lag = Gauge(
            "crosstalk_sink_lag_messages", "events in the stream not yet acked by the sink",
            registry=registry)
        self.write_seconds = Histogram(
            "crosstalk_sink_write_seconds", "write+fsync latency per batch of lines",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.dropped = Counter(
            "crosstalk_sink_dropped_total", "events acked without effect, by reason",
            ["reason"], registry=registry)  # invalid|stale_attempt
        self.held = Gauge(
            "crosstalk_sink_held_turns", "out-of-order turns buffered until their gap fills",
            registry=registry)
        self.turns_refused = Counter(
            "crosstalk_sink_turns_refused_total",
            "turns never written: their lease was not the live lease of that role in that room at that time",
            ["reason"], registry=registry)  # no_lease|unknown|superseded|released|expired
        self.conflicts = Counter(
            "crosstalk_sink_conflicts_total", "turn events kept out: index already stored with a different text",
            registry=registry)
        for reason in ("no_lease", "unknown", "superseded", "released", "expired"):
            self.turns_refused.labels(reason)
        self.incomplete = Counter(
            "crosstalk_sink_transcripts_incomplete_total",
            "completed conversations failed as transcript_incomplete (file short when the batch finished)",
            registry=registry)
        # voice mode, measured on each merged recording (services/sink/core/voice.py; README "Voice metrics")
        self.voice_recordings = Counter(
            "crosstalk_voice_recordings_total", "stereo conversation recordings written", registry=registry)
        self.voice_heard_latency = Histogram(
            "crosstalk_voice_heard_latency_seconds",
            "per turn: its speech start minus the previous turn's speech end in the recording (negative: overlap)",
            buckets=(-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0), registry=registry)
        self.voice_overlap_ratio = Histogram(
            "crosstalk_voice_overlap_ratio", "per conversation: seconds both speak / seconds anyone speaks",
            buckets=(0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0), registry=registry)
        self.voice_awkward_silences = Counter(
            "crosstalk_voice_awkward_silences_total", "silences over 3 s between speech", registry=registry)
        self.voice_unanswered_turns = Counter(
            "crosstalk_voice_unanswered_turns_total", "turns the other side did not answer within 10 s",
            registry=registry)
        self.voice_false_interruptions = Counter(
            "crosstalk_voice_false_interruptions_total",
            "speech starting while the other side speaks that starts no turn", registry=registry)
        self.voice_time_to_first_audio = Histogram(
            "crosstalk_voice_time_to_first_audio_seconds",
            "per conversation: first audio in the room minus when the customer's first reply was asked for",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.voice_stt_wer = Histogram(
            "crosstalk_voice_stt_wer", "per conversation: word error rate of heard_text against the spoken text",
            buckets=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0), registry=registry)
        self.voice_turns_heard = Counter(
            "crosstalk_voice_turns_heard_total", "voice turns by how the listener heard them", ["via"],
            registry=registry)  # stt|speaker_text|none


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.active_jobs = Gauge("crosstalk_worker_active_jobs", "jobs running in this worker", registry=registry)
        self.capacity = Gauge("crosstalk_worker_capacity_sessions", "agent sessions this worker announces",
                              registry=registry)
        self.peak_active = Gauge("crosstalk_worker_peak_active_jobs", "most jobs this worker ran at once",
                                 registry=registry)
        self.load = Gauge("crosstalk_worker_load", "load reported to livekit-server (0..1)", registry=registry)
        self.heartbeat = Gauge("crosstalk_worker_heartbeat_timestamp_seconds",
                               "last time the worker's event loop ran (the watchdog reads it)", registry=registry)
        self.jobs = Counter("crosstalk_worker_jobs_total", "jobs by outcome", ["outcome"], registry=registry)
        self.turns = Counter("crosstalk_turns_total", "turns spoken by role", ["role"], registry=registry)
        self.first_token = Histogram(
            "crosstalk_turn_first_token_seconds", "peer message received to first model token",
            ["role"], buckets=LATENCY_BUCKETS, registry=registry)
        self.turn_seconds = Histogram(
            "crosstalk_turn_seconds", "peer message received to reply sent", ["role"],
            buckets=LATENCY_BUCKETS, registry=registry)
        for outcome in ("started", "completed", "failed", "denied", "error", "bad_metadata"):
            self.jobs.labels(outcome)
        for role in ROLE_LABELS:
            self.turns.labels(role)
            self.first_token.labels(role)
            self.turn_seconds.labels(role)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "crosstalk_webhook_requests_total", "livekit-server webhook requests by outcome",
            ["outcome"], registry=registry)  # published|ignored|unauthorized|bad_request|error
        self.events = Counter(
            "crosstalk_webhook_events_total", "verified webhooks published, by event",
            ["event"], registry=registry)
        self.publish_seconds = Histogram(
            "crosstalk_webhook_publish_seconds", "request received to JetStream ack",
            buckets=LATENCY_BUCKETS, registry=registry)
        for outcome in ("published", "ignored", "unauthorized", "bad_request", "error"):
            self.requests.labels(outcome)
        for event in ("room_started", "room_finished", "participant_joined", "participant_left"):
            self.events.labels(event)


class ModelMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "crosstalk_model_requests_total", "chat completions served by role", ["role"], registry=registry)
        self.request_seconds = Histogram(
            "crosstalk_model_request_seconds", "chat completion total time", buckets=LATENCY_BUCKETS,
            registry=registry)
        for role in ROLE_LABELS:
            self.requests.labels(role)


RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)
SPEECH_ENDPOINTS = ("speech", "transcriptions", "voices")
SPEECH_ENGINES = ("piper", "espeak", "whisper")


class SpeechMetrics:
    """services/speech: requests, latency, real-time factor (compute time / audio time) per engine."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "crosstalk_speech_requests_total", "speech API requests by endpoint and outcome",
            ["endpoint", "outcome"], registry=registry)  # outcome: ok|bad_request|error|aborted (client left)
        self.request_seconds = Histogram(
            "crosstalk_speech_request_seconds", "request received to last byte sent", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.first_audio = Histogram(
            "crosstalk_speech_first_audio_seconds", "speech request received to first audio byte sent",
            ["engine"], buckets=LATENCY_BUCKETS, registry=registry)
        self.rtf = Histogram(
            "crosstalk_speech_real_time_factor", "engine compute seconds per second of audio",
            ["engine"], buckets=RTF_BUCKETS, registry=registry)
        self.audio_seconds = Counter(
            "crosstalk_speech_audio_seconds_total", "seconds of audio synthesised (piper, espeak) or "
            "transcribed (whisper)", ["engine"], registry=registry)
        self.compute_seconds = Counter(
            "crosstalk_speech_compute_seconds_total", "engine wall seconds spent", ["engine"], registry=registry)
        self.busy = Gauge("crosstalk_speech_jobs_running", "engine jobs running in the pool", registry=registry)
        self.waiting = Gauge("crosstalk_speech_jobs_waiting", "engine jobs waiting for a pool slot",
                             registry=registry)
        for endpoint in SPEECH_ENDPOINTS:
            self.request_seconds.labels(endpoint)
            for outcome in ("ok", "bad_request", "error", "aborted"):
                self.requests.labels(endpoint, outcome)
        for engine in SPEECH_ENGINES:
            self.rtf.labels(engine)
            self.audio_seconds.labels(engine)
            self.compute_seconds.labels(engine)
            if engine != "whisper":
                self.first_audio.labels(engine)


def serve(process: str, host: str, port: int) -> int:
    """Start the /metrics HTTP server; ``port`` 0 means this process's default."""
    chosen = port or DEFAULT_PORTS[process]
    start_http_server(chosen, addr=host)
    return chosen
