"""Step-time statistics on synthetic timings: hand-computed values, numpy as the reference, edge cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rapidlm.profile.stats import Histogram, default_bins, histogram, mean, percentile, std, step_stats


def test_hand_computed_values():
    s = step_stats([0.005, 0.001, 0.004, 0.002, 0.003], bins=4)  # order must not matter
    assert s.n == 5 and s.total == pytest.approx(0.015)
    assert s.mean == pytest.approx(0.003)
    assert s.std == pytest.approx(math.sqrt(2.5) * 1e-3)  # sample std: sum of squares 10e-6 / (5 - 1)
    assert (s.min, s.max) == (0.001, 0.005)
    assert s.p50 == pytest.approx(0.003)
    assert s.p90 == pytest.approx(0.0046)  # position 0.9 * 4 = 3.6: 0.004 + 0.6 * 0.001
    assert s.p99 == pytest.approx(0.00496)
    # 4 bins over [1, 5] ms, width 1 ms: 1 | 2 | 3 | 4 and 5 (the last bin is closed)
    assert s.histogram.counts == (1, 1, 1, 2)
    assert s.histogram.edges == pytest.approx((0.001, 0.002, 0.003, 0.004, 0.005))
    assert s.cv == pytest.approx(s.std / s.mean)


@pytest.mark.parametrize("n", [1, 2, 7, 63, 1000])
def test_matches_numpy_on_skewed_timings(n):
    rng = random.Random(n)
    # Decode-like timings: a 15 ms floor, log-normal jitter, a few 3x outliers (GC, preemption by the OS).
    times = [0.015 * (1 + rng.lognormvariate(-2, 0.7)) * (3 if rng.random() < 0.02 else 1) for _ in range(n)]
    s = step_stats(times, bins=9)
    a = np.array(times)
    assert s.mean == pytest.approx(a.mean(), rel=1e-12)
    assert s.std == pytest.approx(a.std(ddof=1) if n > 1 else 0.0, rel=1e-9, abs=1e-15)
    for q, got in ((50, s.p50), (90, s.p90), (99, s.p99)):
        assert got == pytest.approx(np.percentile(a, q), rel=1e-12)
    assert (s.min, s.max) == (a.min(), a.max())
    if n > 1:
        counts, edges = np.histogram(a, bins=9)
        assert s.histogram.counts == tuple(int(c) for c in counts)
        assert s.histogram.edges == pytest.approx(tuple(edges), rel=1e-12)
    assert sum(s.histogram.counts) == n


def test_values_on_bin_edges_land_where_numpy_puts_them():
    times = [0.1 * i for i in range(11)]  # 0.0 .. 1.0: every 0.1 is an edge of 10 bins, with rounding noise
    counts, _ = np.histogram(times, bins=10)
    assert histogram(times, bins=10).counts == tuple(int(c) for c in counts)


def test_single_and_constant_timings():
    one = step_stats([0.02])
    assert one.std == 0.0 and one.p50 == one.p99 == one.min == one.max == 0.02
    same = step_stats([0.01] * 50, bins=5)
    assert same.std == 0.0 and same.p90 == 0.01
    assert sum(same.histogram.counts) == 50
    assert same.histogram.edges[0] < 0.01 < same.histogram.edges[-1]  # a range around the value, not zero-width


def test_percentiles_are_ordered_and_bounded():
    rng = random.Random(0)
    for _ in range(200):
        times = [rng.random() * 1e-3 for _ in range(rng.randint(1, 40))]
        s = step_stats(times)
        assert s.min <= s.p50 <= s.p90 <= s.p99 <= s.max
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0 and percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_default_bins_grow_slowly_and_stay_bounded():
    assert default_bins(1) == 5 and default_bins(64) == 7 and default_bins(1000) == 11
    assert default_bins(10**9) == 31 and default_bins(10**30) == 50


@pytest.mark.parametrize(
    "times, match",
    [([], "empty"), ([0.1, -0.1], r"times\[1\]"), ([float("nan")], r"times\[0\]"), ([float("inf")], "finite")],
)
def test_bad_timings_are_refused(times, match):
    with pytest.raises(ValueError, match=match):
        step_stats(times)
    with pytest.raises(ValueError, match=match):
        mean(times)
    with pytest.raises(ValueError, match=match):
        std(times)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="bins"):
        histogram([1.0, 2.0], bins=0)
    with pytest.raises(ValueError, match="Histogram.edges"):
        Histogram((0.0, 1.0), (1, 2))


def test_to_dict_is_json_ready():
    d = step_stats([0.01, 0.02, 0.03]).to_dict()
    assert set(d) >= {"n", "mean", "std", "p50", "p90", "p99", "min", "max", "histogram", "cv"}
    assert set(d["histogram"]) == {"edges", "counts"}
    assert len(d["histogram"]["edges"]) == len(d["histogram"]["counts"]) + 1
