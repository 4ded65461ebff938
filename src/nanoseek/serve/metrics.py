"""The server's /metrics page: HTTP request counts and the engine's counters in Prometheus' text format
(version 0.0.4), written by hand: a dozen lines do not need prometheus-client."""

from __future__ import annotations

from collections import Counter

from nanoseek.infer.engine import Engine


def prometheus_text(engine: Engine, requests: Counter) -> str:
    """`requests` counts HTTP responses by (path, status code)."""
    s = engine.stats
    rate = s.generated_tokens / s.busy_seconds if s.busy_seconds else 0.0
    lines = [
        "# HELP nanoseek_http_requests_total HTTP requests by path and status code.",
        "# TYPE nanoseek_http_requests_total counter",
    ]
    for (path, status), n in sorted(requests.items()):
        lines.append(f'nanoseek_http_requests_total{{path="{path}",status="{status}"}} {n}')
    rows = [
        ("engine_requests_submitted_total", "counter", "Requests accepted by the engine.", s.requests_submitted),
        ("engine_requests_finished_total", "counter", "Requests that ran to a stop token or max_tokens.",
         s.requests_finished),
        ("engine_requests_cancelled_total", "counter", "Requests cancelled (client gone, stop string).",
         s.requests_cancelled),
        ("engine_requests_rejected_total", "counter", "Requests refused because the queue was full.",
         s.requests_rejected),
        ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", s.prompt_tokens),
        ("generated_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
        ("engine_busy_seconds_total", "counter", "Seconds the engine spent in steps.", round(s.busy_seconds, 6)),
        ("generation_tokens_per_second", "gauge", "Generated tokens per busy engine second.", round(rate, 3)),
        ("queue_depth", "gauge", "Requests waiting for a batch slot.", engine.queue_depth()),
        ("batch_size", "gauge", "Requests in the running batch.", engine.batch_size()),
        ("max_batch_size", "gauge", "Batch slots (preallocated cache).", engine.max_batch_size),
        ("speculative_acceptance_rate", "gauge", "Accepted MTP drafts / drafts.", round(s.acceptance_rate, 6)),
    ]
    for name, kind, help_text, value in rows:
        lines += [f"# HELP nanoseek_{name} {help_text}", f"# TYPE nanoseek_{name} {kind}", f"nanoseek_{name} {value}"]
    return "\n".join(lines) + "\n"
