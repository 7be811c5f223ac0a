"""Prometheus metrics, one registry per app (no module-level global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from decoding.engine import Engine


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aligner_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        Gauge(
            "aligner_engine_unfinished_requests",
            "Requests the engine still tracks (waiting or running).",
            registry=self.registry,
        ).set_function(engine.num_unfinished_requests)
        Gauge(
            "aligner_engine_ready", "1 when the engine is loaded and alive.", registry=self.registry
        ).set_function(lambda: float(engine.ready))

    def render(self) -> bytes:
        return generate_latest(self.registry)
