"""Prometheus metrics, in the server's own registry (several apps in one process, as tests build, never clash).

Two sources: the engine's own counts, read from `engine.stats()` at scrape time (so they are never stale and
the step loop does no metrics work), and latencies the app sees as outputs arrive (time to first token,
inter-token gaps, finish reasons).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Time to first token spans queueing + prefill (ms to minutes on a CPU); a token gap is ms to seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# (metric name, EngineStats field, help) read from the engine at each scrape.
_GAUGES = (
    ("rapidlm_requests_running", "running", "Requests the engine is generating for now."),
    ("rapidlm_requests_queued", "waiting", "Requests admitted and waiting to start (or preempted)."),
    ("rapidlm_kv_blocks_used", "kv_blocks_used", "KV-cache blocks held by requests."),
    ("rapidlm_kv_blocks_total", "kv_blocks_total", "KV-cache blocks in the pool."),
)
_COUNTERS = (  # CounterMetricFamily adds the _total suffix
    ("rapidlm_prompt_tokens", "prompt_tokens", "Prompt tokens processed."),
    ("rapidlm_generation_tokens", "generation_tokens", "Tokens generated."),
    ("rapidlm_preemptions", "preemptions", "Requests preempted (their KV blocks taken back) under memory pressure."),
    ("rapidlm_prefix_cache_query_tokens", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("rapidlm_prefix_cache_hit_tokens", "prefix_cache_hits", "Prompt tokens served from the prefix cache."),
    ("rapidlm_engine_steps", "steps", "Engine steps run."),
)


class _EngineCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine.stats()
        except Exception:  # noqa: BLE001 - a stopped engine must not break the scrape of everything else
            return
        for name, field, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=float(getattr(stats, field)))
        total = float(stats.kv_blocks_total)
        used = float(stats.kv_blocks_used)
        yield GaugeMetricFamily(
            "rapidlm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", value=used / total if total else 0.0
        )
        for name, field, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(getattr(stats, field)))


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        r = self.registry
        self.ttft = Histogram(
            "rapidlm_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "rapidlm_inter_token_latency_seconds",
            "Gap between a request's successive output tokens (a step's gap split over the tokens it brought).",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "rapidlm_request_latency_seconds",
            "From a request's arrival to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "rapidlm_requests", "Requests ended, by finish reason (stop, length, abort).", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "rapidlm_requests_rejected", "Requests refused before admission, by HTTP status.", ["status"], registry=r
        )
        for reason in ("stop", "length", "abort"):  # present from the first scrape, so rate() works at once
            self.finished.labels(finish_reason=reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Observes one request (one prompt) as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: float | None = None
        self.done = False

    def tokens(self, n: int) -> None:
        """`n` new tokens arrived now."""
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
            n -= 1  # the first token's wait is the TTFT; any others in the same output are gaps of ~0
            gap = 0.0
        else:
            gap = (now - self.last) / n
        for _ in range(n):
            self.metrics.itl.observe(gap)
        self.last = now

    def finish(self, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.finished.labels(finish_reason=reason or "abort").inc()
        self.metrics.latency.observe(time.perf_counter() - self.start)
