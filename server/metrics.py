"""Prometheus metrics (served over HTTP when the server is given a metrics port).

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `polydecode_time_to_first_token_
seconds`), so existing dashboards translate. Each server owns its registry, so several servers
(tests) can live in one process.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, load_fn) -> None:
        """`load_fn()` returns the engine's load dict (running, waiting, kv blocks), or None
        before the engine is loaded."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("polydecode_requests", "Finished generation RPCs by status",
                                ["code"], registry=r)
        self.ttft = Histogram("polydecode_time_to_first_token_seconds", "Admission to first "
                              "token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("polydecode_inter_token_latency_seconds", "Gap between "
                             "consecutive token deltas", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("polydecode_e2e_request_latency_seconds", "Admission to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("polydecode_request_queue_time_seconds", "Admission to first "
                               "scheduled step", buckets=_LATENCY_BUCKETS, registry=r)
        for key, doc in (("running", "Requests running"), ("waiting", "Requests waiting"),
                         ("kv_blocks_used", "KV blocks in use"),
                         ("kv_blocks_total", "KV blocks in the cache"),
                         ("num_preemptions", "Preemptions since start")):
            gauge = Gauge(f"polydecode_{key}", doc, registry=r)
            gauge.set_function(lambda key=key: (load_fn() or {}).get(key, 0))

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


class RequestTimer:
    """Per-request latency bookkeeping that feeds the histograms."""

    __slots__ = ("metrics", "last_token_time")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.last_token_time: float | None = None

    def on_tokens(self, arrival: float) -> None:
        now = time.monotonic()
        if self.last_token_time is None:
            self.metrics.ttft.observe(now - arrival)
        else:
            self.metrics.itl.observe(now - self.last_token_time)
        self.last_token_time = now

    def on_finish(self, arrival: float, queue_time: float | None) -> None:
        self.metrics.e2e.observe(time.monotonic() - arrival)
        if queue_time is not None:
            self.metrics.queue.observe(queue_time)
