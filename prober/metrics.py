"""Prometheus metrics of health checks: outcomes and latency, by cluster.

The control plane registers them for its embedded prober (on its `/metrics`); a prober running
on its own (`healthplane prober --metrics HOST:PORT`) serves them itself, as each process in a
Prometheus setup does, so every check is counted where it ran, not sampled over the link.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from prober.state import CheckResult, Target

CHECK_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class CheckMetrics:
    """`healthplane_checks_total{cluster,outcome}` and `healthplane_check_latency_seconds{cluster,check}`."""

    def __init__(self, registry: CollectorRegistry, *, who: str = "the embedded prober") -> None:
        self.checks = Counter(
            "healthplane_checks",
            f"Health checks run by {who}, by cluster and outcome (success, http_failure, ...).",
            ["cluster", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "healthplane_check_latency_seconds",
            f"Health check latency ({who}), by cluster and check type.",
            ["cluster", "check"],
            buckets=CHECK_LATENCY_BUCKETS,
            registry=registry,
        )

    def on_check(self, target: Target, result: CheckResult) -> None:
        """A `Prober.check_listeners` callback."""
        self.checks.labels(target.cluster, result.kind.value).inc()
        self.latency.labels(target.cluster, target.health_check.kind).observe(result.latency)
