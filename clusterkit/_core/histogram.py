"""A cheap latency histogram, observed on hot paths and rendered at scrape time.

Theory of operation
-------------------
``observe`` costs a ``bisect`` over a short tuple of bucket bounds and two additions: no
locks (each histogram is written by one thread, the Trio thread), no allocation. The
Prometheus collector turns the per-bucket counts into cumulative buckets when scraped.
"""

from __future__ import annotations

from bisect import bisect_left

ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds: a loopback etcd answers in ~0.5 ms, a loaded or remote one in tens of ms."""
HOOK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Seconds: a hook that only records a role returns in microseconds; one that copies a
partition's data can take minutes."""
REBALANCE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds: from a plan with moves to the map that commits the last of them."""


class Histogram:
    """Counts observations per bucket (``value <= bound``), plus their sum."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of observations <= le), ..., ("+Inf", count)]``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", self.count))
        return out


class OperationStats:
    """Per operation name: calls, failures, and a latency histogram (etcd operations)."""

    def __init__(self, bounds: tuple[float, ...] = ETCD_BUCKETS) -> None:
        self._bounds = bounds
        self.latency: dict[str, Histogram] = {}
        self.errors: dict[str, int] = {}

    def _histogram(self, op: str) -> Histogram:
        h = self.latency.get(op)
        if h is None:
            h = self.latency[op] = Histogram(self._bounds)
            self.errors[op] = 0
        return h

    def succeeded(self, op: str, seconds: float) -> None:
        self._histogram(op).observe(seconds)

    def failed(self, op: str, seconds: float) -> None:
        self._histogram(op).observe(seconds)
        self.errors[op] += 1
