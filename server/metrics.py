"""Prometheus metrics, one registry per app (no module-level global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from decoding.engine import Engine

STORE_FEEDBACK_KINDS = ("rating", "preference", "pairwise", "comment")
STORE_ERROR_KINDS = ("queue_full", "write_failed", "request_failed")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, engine: Engine, admission=None, rewards=None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("aligner_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r)
        self.errors = Counter("aligner_errors", "Error responses by OpenAI error type.", ["type"], registry=r)
        self.stream_errors = Counter("aligner_stream_errors", "Errors sent inside a stream already answered 200.",
                                     ["endpoint", "type"], registry=r)
        self.ttft = Histogram("aligner_time_to_first_token_seconds", "Time to the first content token.", ["strategy"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("aligner_request_seconds", "End-to-end request latency.", ["strategy"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("aligner_generated_tokens", "Tokens the policy generated.", ["strategy"], registry=r)
        self.candidates = Histogram("aligner_candidates_per_request", "Sequences decoded per request.", ["strategy"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.fallbacks = Counter("aligner_fallbacks", "Requests answered plainly after a reward failure.", ["strategy"], registry=r)
        self.budget_exhausted = Counter("aligner_budget_exhausted", "Requests answered with their best answer so "
                                        "far at a limit (deadline or max_total_tokens).", ["strategy", "limit"],
                                        registry=r)
        self.reward_calls = Counter("aligner_reward_calls", "Reward scoring calls.", ["reward", "outcome"], registry=r)
        self.reward_seconds = Histogram("aligner_reward_seconds", "Reward scoring latency per call.", ["reward"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_restarts = Counter("aligner_engine_restarts", "Engine restarts after a fault.", registry=r)
        self.admission_rejections = Counter("aligner_admission_rejections", "Requests refused with 429.", ["reason"], registry=r)
        Gauge("aligner_engine_unfinished_requests", "Requests the engine still tracks (waiting or running).", registry=r).set_function(engine.num_unfinished_requests)
        Gauge("aligner_engine_ready", "1 when the engine is loaded and alive.", registry=r).set_function(lambda: float(engine.ready))
        if admission is not None:
            Gauge("aligner_running_requests", "Admitted requests in progress.", registry=r).set_function(lambda: admission.running_requests)
            Gauge("aligner_running_sequences", "Sequences decoded by admitted requests.", registry=r).set_function(lambda: admission.running_sequences)
            Gauge("aligner_queued_requests", "Requests waiting for admission.", registry=r).set_function(lambda: admission.queued_requests)
            Gauge("aligner_guide_slots_in_use", "Token-level guide slots held by admitted requests.",
                  registry=r).set_function(lambda: admission.guide_slots_in_use)

        if rewards is not None:
            r.register(_RewardQueues(rewards))
        self.feedback = Counter("aligner_feedback", "Feedback rows stored, by kind (a client-key retry is not "
                                "counted again).", ["kind"], registry=r)
        self.store_errors = Counter(
            "aligner_store_errors", "Store failures, by kind: queue_full and write_failed (a background write "
            "dropped; its response went out anyway), request_failed (an endpoint's store call failed: 503; "
            "an experiment arm's look-up failed: the hashed arm was used).",
            ["kind"], registry=r)
        self.traces_written = Counter("aligner_traces_written", "Response traces written to the store.", registry=r)
        self.experiment_assignments = Counter(
            "aligner_experiment_assignments", "Requests assigned an experiment arm, by experiment, arm and unit "
            "(user: by the request's user, sticky; random).", ["experiment", "arm", "unit"], registry=r)
        # Per tenant (a label value from the key file, "default" for keys without one: bounded).
        self.tenant_requests = Counter("aligner_tenant_requests", "Requests by the tenant of their key (probes "
                                       "not counted).", ["tenant"], registry=r)
        self.tenant_tokens = Counter("aligner_tenant_generated_tokens", "Tokens the policy generated for a tenant's "
                                     "keys (candidates included).", ["tenant"], registry=r)
        self.rate_limited = Counter("aligner_rate_limited", "Requests refused with 429 by their key's limit "
                                    "(rpm or tokens_per_day).", ["tenant", "limit"], registry=r)
        for kind in STORE_FEEDBACK_KINDS:
            self.feedback.labels(kind)
        for kind in STORE_ERROR_KINDS:
            self.store_errors.labels(kind)

    def watch_store_writer(self, writer) -> None:
        """`aligner_store_pending`: writes the store's background writer holds, read at scrape time."""
        Gauge("aligner_store_pending", "Store writes queued or in progress in the background writer.",
              registry=self.registry).set_function(lambda: writer.pending)
        Gauge("aligner_store_pending_bytes", "Bytes of the store writes queued in the background writer.",
              registry=self.registry).set_function(lambda: writer.pending_bytes)
        Gauge("aligner_store_full", "1 while the writer's queue is at its bound in writes or bytes (new traces "
              "are dropped).", registry=self.registry).set_function(lambda: float(writer.full))

    def observe_reward(self, name: str, seconds: float, ok: bool) -> None:
        self.reward_calls.labels(name, "ok" if ok else "error").inc()
        if ok:
            self.reward_seconds.labels(name).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RewardQueues:
    """`aligner_reward_pending{reward}`: score calls each reward model holds (running or
    waiting in its bounded queue), read at scrape time."""

    def __init__(self, rewards):
        self.rewards = rewards

    def collect(self):
        family = GaugeMetricFamily("aligner_reward_pending", "Score calls each reward model holds, running or queued.",
                                   labels=["reward"])
        for name, count in sorted(self.rewards.pending().items()):
            family.add_metric([self.rewards.metric_label(name)], count)
        yield family
