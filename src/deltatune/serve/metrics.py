"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own per engine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "deltatune_requests", "HTTP requests answered", ["endpoint", "adapter", "status"], registry=r
        )
        self.tokens = Counter(
            "deltatune_tokens",
            "tokens read (prompt) and written (completion)",
            ["adapter", "kind"],
            registry=r,
        )
        self.queue_depth = Gauge("deltatune_queue_depth", "rows waiting to join the batch", registry=r)
        self.running = Gauge("deltatune_running_rows", "rows in the running batch", registry=r)
        self.loaded_adapters = Gauge("deltatune_loaded_adapters", "adapters in memory", registry=r)
        self.ttft = Histogram(
            "deltatune_time_to_first_token_seconds",
            "from a row's arrival to its first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "deltatune_inter_token_latency_seconds",
            "between two tokens of one row",
            buckets=_LATENCY,
            registry=r,
        )
        self.steps = Counter(
            "deltatune_decode_steps",
            "decoding steps (kind=decode) and prompts prefilled (kind=prefill: on their own, or folded into a "
            "decoding step, which then counts once as a decoding step too)",
            ["kind"],
            registry=r,
        )
        self.adapter_events = Counter(
            "deltatune_adapter_events",
            "adapter loads, evictions, failed loads and pauses (its slot given to a waiting request)",
            ["event"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
