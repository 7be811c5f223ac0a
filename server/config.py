"""Server-side limits and settings (HTTP layer). Engine settings live in `decoding`."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.admission import AdmissionConfig


@dataclass(frozen=True)
class StoreConfig:
    """What the server keeps in its store (`aligner.store`), when it has one."""

    # Store every chat and Responses answer's trace (`--store-traces`).
    traces: bool = False
    # Let a request ask for its own trace with `alignment.trace: true` (`--allow-request-traces`).
    allow_request_traces: bool = False
    # Traces and feedback older than this are deleted in the background; None keeps them.
    retention_days: float | None = 30.0
    prune_interval_s: float = 3600.0
    # Writes waiting for the background writer; beyond this a trace is dropped (and counted).
    max_pending: int = 1000
    # ... and their bytes (a trace's JSON size): a few huge traces fill the queue as many small do.
    max_pending_bytes: int = 64 << 20
    # The most one stored trace keeps: beyond it the request's settings, tools and the
    # answers as returned are replaced by a marker (conversation and candidates are kept).
    max_trace_bytes: int = 256 << 10
    # An endpoint's own store call (feedback, trace reads, deletions) answers 503 after this.
    request_timeout_s: float = 15.0
    # How long feedback or a read waits for a trace this process is still writing.
    trace_wait_s: float = 2.0
    # How long a request waits for its user's stored experiment arm; then the hashed arm is used.
    assignment_timeout_s: float = 1.0
    # Threads for the endpoints' store calls: a hung database holds at most these.
    threads: int = 4


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    # A file of keys, one per line, re-read on SIGHUP; any of them (or `api_key`) is accepted.
    api_key_file: str | None = None
    # A key of the metrics role (probes, Prometheus), beside the others.
    metrics_key: str | None = None
    # Every client-pushable limit has a server-side maximum.
    max_n: int = 8
    max_prompts_per_request: int = 16
    # Strategy a request gets when neither body, header nor model alias names one.
    default_strategy: str = "none"
    max_candidates: int = 16
    # Caps on every aligned request's wall clock and generated tokens (`alignment.deadline_s`,
    # `alignment.max_total_tokens`), also applied when a request names none; None: no cap.
    max_request_seconds: float | None = 600.0
    max_request_tokens: int | None = None
    # Seconds between SSE keep-alive comments while a multi-sample strategy decides.
    stream_keepalive_s: float = 2.0
    max_body_bytes: int = 1 << 20
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    # A dead engine is restarted at most this many times, waiting 2^k seconds before try k.
    max_engine_restarts: int = 5
    engine_poll_s: float = 1.0
    # Start the policy, then each helper, one at a time (on a GPU, where vLLM profiles memory).
    start_engines_in_turn: bool = False
    store: StoreConfig = field(default_factory=StoreConfig)
