"""Step-time statistics: pure functions over a list of durations (seconds), no torch, no clocks.

Kept apart from the profiler so the numbers a report prints can be checked on synthetic timings: percentiles
interpolate linearly between order statistics (numpy's default, "type 7"), the standard deviation is the sample
one (n - 1), and the histogram's bins are equal-width over [min, max] with the last bin closed, as numpy's are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def _checked(times: Sequence[float], what: str = "times") -> list[float]:
    values = [float(t) for t in times]
    if not values:
        raise ValueError(f"{what} is empty: statistics need at least one timing")
    for i, v in enumerate(values):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}[{i}] must be a finite, non-negative duration, got {v!r}")
    return values


def mean(times: Sequence[float]) -> float:
    values = _checked(times)
    return math.fsum(values) / len(values)


def std(times: Sequence[float]) -> float:
    """Sample standard deviation (divides by n - 1); 0.0 for a single timing."""
    values = _checked(times)
    if len(values) == 1:
        return 0.0
    m = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def percentile(times: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest order statistics (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    values = sorted(_checked(times))
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    # Clamped to its two neighbours: rounding must never put p99 above the max or p50 below the min.
    return min(max(values[lo] + (values[hi] - values[lo]) * (pos - lo), values[lo]), values[hi])


@dataclass(frozen=True)
class Histogram:
    """Equal-width bins: edges has len(counts) + 1 entries; bin i holds edges[i] <= t < edges[i+1] (the last
    bin also holds its right edge, so max(times) is counted)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError(f"Histogram.edges must have len(counts) + 1 = {len(self.counts) + 1} entries, "
                             f"got {len(self.edges)}")
        if any(b < a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("Histogram.edges must be non-decreasing")
        if any(c < 0 for c in self.counts):
            raise ValueError("Histogram.counts must be non-negative")


def default_bins(n: int) -> int:
    """Sturges' rule with a floor of 5 and a ceiling of 50: enough shape for 16..10^6 steps, no comb of empties."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return max(5, min(50, math.ceil(math.log2(n)) + 1))


def histogram(times: Sequence[float], bins: int | None = None) -> Histogram:
    values = _checked(times)
    bins = default_bins(len(values)) if bins is None else bins
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    lo, hi = min(values), max(values)
    if hi == lo:  # every step took the same time: bins spread over 1 us around it (numpy
        # widens by ±0.5 of the value's unit, which for seconds would be absurd)
        lo, hi = lo - 0.5e-6, hi + 0.5e-6
    width = (hi - lo) / bins
    edges = tuple(lo + i * width for i in range(bins)) + (hi,)
    counts = [0] * bins
    for v in values:
        i = min(int((v - lo) / width), bins - 1)
        # Floating-point division can land a value that sits exactly on an edge one bin off: correct it so the
        # bin always satisfies edges[i] <= v < edges[i + 1].
        if i > 0 and v < edges[i]:
            i -= 1
        elif i < bins - 1 and v >= edges[i + 1]:
            i += 1
        counts[i] += 1
    return Histogram(edges, tuple(counts))


@dataclass(frozen=True)
class StepStats:
    """Summary of n step durations, in seconds."""

    n: int
    total: float
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float
    histogram: Histogram

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"StepStats.n must be >= 1, got {self.n}")
        if not self.min <= self.p50 <= self.p90 <= self.p99 <= self.max:
            raise ValueError("StepStats: min <= p50 <= p90 <= p99 <= max must hold")
        if sum(self.histogram.counts) != self.n:
            raise ValueError(f"StepStats.histogram must count all {self.n} steps, got {sum(self.histogram.counts)}")

    @property
    def cv(self) -> float:
        """Coefficient of variation (std / mean): how steady the steps are, independent of their length."""
        return self.std / self.mean if self.mean > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["histogram"] = {"edges": list(self.histogram.edges), "counts": list(self.histogram.counts)}
        d["cv"] = self.cv
        return d


def step_stats(times: Sequence[float], bins: int | None = None) -> StepStats:
    values = _checked(times)
    return StepStats(
        n=len(values),
        total=math.fsum(values),
        mean=mean(values),
        std=std(values),
        min=min(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        max=max(values),
        histogram=histogram(values, bins),
    )
