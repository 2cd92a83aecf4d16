"""A Prometheus histogram for the ADS hot path: one list increment per observation, no lock.

prometheus-client's `Histogram.labels(...).observe(...)` takes a lock and looks the child up on
every call; on a push to N nodes the propagation tracker observes N delays, and that was most of
what measuring cost (bench/propagation.py). The control plane observes from its event loop
only, so plain per-label bucket counts, turned into a histogram family at scrape time, suffice.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class LoopHistogram(Collector):
    """A histogram with one label, observed from a single thread (the event loop)."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[str, list[int]] = {}  # label value -> per bucket (the last: above every bound)
        self._sums: dict[str, float] = {}

    def observe(self, value: float, label: str) -> None:
        counts = self._counts.get(label)
        if counts is None:
            counts = self._counts[label] = [0] * (len(self.buckets) + 1)
            self._sums[label] = 0.0
        counts[bisect_left(self.buckets, value)] += 1  # bucket `le` counts values <= le
        self._sums[label] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for label, counts in sorted(self._counts.items()):
            cumulative, running = [], 0
            for bound, n in zip((*(repr(float(b)) for b in self.buckets), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            family.add_metric([label], cumulative, self._sums[label])
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
