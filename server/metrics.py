"""Prometheus metrics of the server (prefix `molmo_`), served at GET /metrics.

Each app has its own CollectorRegistry (several apps can live in one test process). The
page also carries the default registry, where vLLM's engine publishes its `vllm:` metrics.

Latencies are seen from the server: time to first token and end-to-end latency run from
the moment the request's body was parsed; inter-token latency is each request's mean time
between output tokens after the first (one observation per request; vLLM's own per-token
`vllm:inter_token_latency_seconds` is on the same page).
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no `_created` series: they double the page for no use here

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4,
    0.8, 1.6, 3.2,
)  # fmt: skip

# Routes get their own label value; anything else (404s from scanners and fuzzers) is "other",
# so the label's cardinality stays bounded.
ROUTES = ("/v1/chat/completions", "/v1/point", "/v1/models", "/health", "/metrics")


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "molmo_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "molmo_time_to_first_token_seconds",
            "Time from request to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "molmo_inter_token_latency_seconds",
            "Mean time between consecutive generated tokens, one observation per request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "molmo_e2e_request_latency_seconds",
            "Time from request to last token (generation requests)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.image_preprocess = Histogram(
            "molmo_image_preprocess_seconds",
            "Time to fetch and decode a request's images",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "molmo_prompt_tokens", "Prompt tokens processed (image tokens included)", registry=r
        )
        self.generation_tokens = Counter("molmo_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge(
            "molmo_requests_running", "Requests generating tokens in the engine", registry=r
        )
        self.waiting = Gauge(
            "molmo_requests_waiting",
            "Requests admitted and not yet generating (images, queue, prefill)",
            registry=r,
        )

        self.engine_unfinished = Gauge(
            "molmo_engine_unfinished_requests",
            "Requests the engine holds (read from vLLM's output processor)",
            registry=r,
        )

    def route_label(self, path: str) -> str:
        return path if path in ROUTES else "other"

    def observe_tokens(self, ttft: float | None, gaps: list[tuple[float, int]]) -> None:
        """`gaps`: (seconds, tokens) spans after the first token."""
        if ttft is not None:
            self.ttft.observe(ttft)
        tokens = sum(n for _, n in gaps)
        if tokens > 0:
            self.itl.observe(sum(seconds for seconds, _ in gaps) / tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)
