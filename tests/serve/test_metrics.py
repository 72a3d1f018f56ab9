"""Metrics: engine gauges read at scrape time, latency histograms from output arrival times."""

from __future__ import annotations

import time

from rapidlm.serve.metrics import ServerMetrics


def sample(metrics: ServerMetrics, name: str, labels: dict | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, name
    return value


def test_engine_stats_are_read_at_scrape_time(engine):
    m = ServerMetrics(engine)
    assert sample(m, "rapidlm_kv_blocks_used") == 0
    engine._counts["blocks"] = 25
    assert sample(m, "rapidlm_kv_blocks_used") == 25
    assert sample(m, "rapidlm_kv_cache_usage_ratio") == 0.25


def test_a_broken_engine_does_not_break_the_scrape(engine):
    m = ServerMetrics(engine)
    engine.stats = lambda: (_ for _ in ()).throw(RuntimeError("stopped"))
    text = m.render().decode()
    assert "rapidlm_time_to_first_token_seconds" in text and "rapidlm_kv_blocks_used" not in text


def test_timer_observes_ttft_gaps_and_finish(engine):
    m = ServerMetrics(engine)
    t = m.timer()
    time.sleep(0.01)
    t.tokens(1)
    t.tokens(0)  # an output without tokens (held-back text) is not a gap
    t.tokens(2)
    t.finish("stop")
    t.finish("abort")  # once only
    assert sample(m, "rapidlm_time_to_first_token_seconds_count") == 1
    assert sample(m, "rapidlm_time_to_first_token_seconds_sum") >= 0.01
    assert sample(m, "rapidlm_inter_token_latency_seconds_count") == 2
    assert sample(m, "rapidlm_requests_total", {"finish_reason": "stop"}) == 1
    assert sample(m, "rapidlm_requests_total", {"finish_reason": "abort"}) == 0


def test_each_app_has_its_own_registry(engine):
    a, b = ServerMetrics(engine), ServerMetrics(engine)
    a.timer().tokens(1)
    assert sample(b, "rapidlm_time_to_first_token_seconds_count") == 0
