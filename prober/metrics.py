"""Prometheus metrics of health checks: outcomes and latency, by cluster.

The control plane registers them for its embedded prober (on its `/metrics`); a prober running
on its own (`healthplane prober --metrics HOST:PORT`) serves them itself, as each process in a
Prometheus setup does, so every check is counted where it ran, not sampled over the link.

With `--processes N` the checks run in worker processes: each sums its checks in a `CheckTally`
and hands the sums (`CheckCounts`) to the parent with its periodic report, and the parent adds
them to its `CheckMetrics` (`add`). A pipe message per report, not per check.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from prober.state import CheckResult, Target

__all__ = ["CHECK_LATENCY_BUCKETS", "CheckCounts", "CheckMetrics", "CheckTally"]

CHECK_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The `le` labels as prometheus_client writes them (its floatToGoString is repr for these values).
_LE = [repr(b) for b in CHECK_LATENCY_BUCKETS] + ["+Inf"]


class CheckCounts(NamedTuple):
    """Checks summed over a while: what a worker process hands its parent.

    `latency` holds per (cluster, check kind) the sum of the latencies, then the number of
    checks per bucket of `CHECK_LATENCY_BUCKETS` (not cumulative), then those above the last.
    """

    checks: dict[tuple[str, str], int]  # (cluster, outcome) -> checks
    latency: dict[tuple[str, str], list[float]]


def _count(
    checks: dict[tuple[str, str], int], latency: dict[tuple[str, str], list[float]], target: Target, result: CheckResult
) -> None:
    key = (target.cluster, result.kind.value)
    checks[key] = checks.get(key, 0) + 1
    key = (target.cluster, target.health_check.kind)
    slot = latency.get(key)
    if slot is None:
        slot = latency[key] = [0.0] * (len(CHECK_LATENCY_BUCKETS) + 2)
    slot[0] += result.latency
    # A bucket counts the values up to and including its bound (Prometheus `le`).
    slot[1 + bisect.bisect_left(CHECK_LATENCY_BUCKETS, result.latency)] += 1


class CheckTally:
    """Sums checks in a worker process until `take` hands them over; a `check_listeners` callback."""

    def __init__(self) -> None:
        self._checks: dict[tuple[str, str], int] = {}
        self._latency: dict[tuple[str, str], list[float]] = {}

    def on_check(self, target: Target, result: CheckResult) -> None:
        _count(self._checks, self._latency, target, result)

    def take(self) -> CheckCounts | None:
        """The sums since the last `take` (None if no check ran), and start again from zero."""
        if not self._checks:
            return None
        counts = CheckCounts(self._checks, self._latency)
        self._checks, self._latency = {}, {}
        return counts


class CheckMetrics:
    """`healthplane_checks_total{cluster,outcome}` and `healthplane_check_latency_seconds{cluster,check}`.

    A collector of its own rather than a prometheus_client Counter and Histogram, so that the
    sums of worker processes can be added in bulk (`add`), which a Histogram cannot take.
    """

    def __init__(self, registry: CollectorRegistry, *, who: str = "the embedded prober") -> None:
        self._checks_help = f"Health checks run by {who}, by cluster and outcome (success, http_failure, ...)."
        self._latency_help = f"Health check latency ({who}), by cluster and check type."
        self._lock = threading.Lock()  # the metrics server's thread reads what the loop's thread counts
        self._checks: dict[tuple[str, str], int] = {}
        self._latency: dict[tuple[str, str], list[float]] = {}
        registry.register(self)

    def on_check(self, target: Target, result: CheckResult) -> None:
        """A `Prober.check_listeners` callback."""
        with self._lock:
            _count(self._checks, self._latency, target, result)

    def add(self, counts: CheckCounts) -> None:
        """Add the sums a worker process handed over (`CheckTally.take`)."""
        with self._lock:
            for key, n in counts.checks.items():
                self._checks[key] = self._checks.get(key, 0) + n
            for key, values in counts.latency.items():
                slot = self._latency.get(key)
                if slot is None:
                    self._latency[key] = list(values)
                else:
                    for i, value in enumerate(values):
                        slot[i] += value

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("healthplane_checks", self._checks_help, labels=["cluster", "outcome"])
        yield HistogramMetricFamily(
            "healthplane_check_latency_seconds", self._latency_help, labels=["cluster", "check"]
        )

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            checks = sorted(self._checks.items())
            latency = sorted((key, list(slot)) for key, slot in self._latency.items())
        family = CounterMetricFamily("healthplane_checks", self._checks_help, labels=["cluster", "outcome"])
        for (cluster, outcome), n in checks:
            family.add_metric([cluster, outcome], n)
        yield family
        histogram = HistogramMetricFamily(
            "healthplane_check_latency_seconds", self._latency_help, labels=["cluster", "check"]
        )
        for (cluster, check), slot in latency:
            buckets: list[tuple[str, float]] = []
            total = 0.0
            for le, count in zip(_LE, slot[1:], strict=True):
                total += count
                buckets.append((le, total))
            histogram.add_metric([cluster, check], buckets, sum_value=slot[0])
        yield histogram
