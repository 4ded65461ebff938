"""The server's /metrics page (Prometheus text format) through prometheus-client, one registry per app.

HTTP: `nanoseek_http_requests_total{route, method, status}` and `nanoseek_http_errors_total{route, code}`,
labelled by the route's template (`/v1/models/{model_id:path}`, never the raw path; unmatched paths are
"other"), so a client cannot grow the label set. Latency histograms, seconds: time to first token, time per
output token after the first (inter-token), end to end. The engine's counters and gauges are read when
the page is scraped: requests submitted / finished / cancelled / rejected, prompt and generated tokens,
busy seconds, generated tokens per busy second, queue depth, running sequences, free and total slots,
MTP acceptance rate.

The paged cache's numbers come from `Engine.cache_metrics()`: every entry `name: value` becomes the gauge
`nanoseek_cache_<name>` (blocks_used, blocks_cached, blocks_free, blocks_total, prefix_hit_tokens,
prefix_query_tokens, evictions, preemptions, ...), and `nanoseek_prefix_cache_hit_rate` is
prefix_hit_tokens / prefix_query_tokens.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e, s = self.engine, self.engine.stats
        counters = [
            ("engine_requests_submitted", "Requests accepted by the engine.", s.requests_submitted),
            ("engine_requests_finished", "Requests that ran to a stop token or max_tokens (or failed).",
             s.requests_finished),
            ("engine_requests_cancelled", "Requests cancelled (client gone, stop string).", s.requests_cancelled),
            ("engine_requests_rejected", "Requests refused because the queue was full.", s.requests_rejected),
            ("prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens),
            ("generated_tokens", "Tokens generated.", s.generated_tokens),
            ("engine_busy_seconds", "Seconds the engine spent in steps.", s.busy_seconds),
        ]
        for name, doc, value in counters:
            m = CounterMetricFamily("nanoseek_" + name, doc)
            m.add_metric([], value)
            yield m
        rate = s.generated_tokens / s.busy_seconds if s.busy_seconds else 0.0
        gauges = [
            ("generation_tokens_per_second", "Generated tokens per busy engine second.", rate),
            ("queue_depth", "Requests waiting for a batch slot.", e.queue_depth()),
            ("batch_size", "Running sequences (requests in the batch).", e.batch_size()),
            ("max_batch_size", "Batch slots.", e.max_batch_size),
            ("free_slots", "Batch slots not held by a request.", e.free_slots()),
            ("speculative_acceptance_rate", "Accepted MTP drafts / drafts.", s.acceptance_rate),
        ]
        cache = e.cache_metrics()
        for name, value in sorted(cache.items()):
            gauges.append(("cache_" + name, f"The cache's {name.replace('_', ' ')}.", float(value)))
        if cache.get("prefix_query_tokens"):
            gauges.append(("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens.",
                           cache.get("prefix_hit_tokens", 0) / cache["prefix_query_tokens"]))
        for name, doc, value in gauges:
            m = GaugeMetricFamily("nanoseek_" + name, doc)
            m.add_metric([], value)
            yield m


class ServerMetrics:
    """The app's registry: HTTP counters, latency histograms, and the engine read at scrape time."""

    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("nanoseek_http_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=r)
        self.errors = Counter("nanoseek_http_errors", "HTTP error responses by route template and status code.",
                              ["route", "code"], registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("nanoseek_inter_token_latency_seconds", "Time per output token after the first.",
                             buckets=_TOKEN, registry=r)
        self.e2e = Histogram("nanoseek_e2e_request_latency_seconds", "From request arrival to its last byte.",
                             buckets=_LATENCY, registry=r)
        r.register(_EngineCollector(engine))

    def observe_response(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds_per_token: float, n: int) -> None:
        for _ in range(n):
            self.itl.observe(seconds_per_token)

    def finished(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
