"""CheckMetrics: the same exposition as prometheus_client's own Counter and Histogram, fed per check or in bulk."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from controlplane.topology.model import HealthCheck, HttpCheck, TcpCheck
from prober.metrics import CHECK_LATENCY_BUCKETS, CheckMetrics, CheckTally
from prober.state import CheckResult, ResultKind, Target

HTTP = Target("web", "127.0.0.1", 80, HealthCheck(kind="http", http=HttpCheck()))
TCP = Target("db", "127.0.0.2", 5432, HealthCheck(kind="tcp", tcp=TcpCheck()))
# Latencies on, between and past the bucket bounds.
CHECKS = [
    (HTTP, CheckResult(ResultKind.SUCCESS, "http 200", latency=0.0005)),
    (HTTP, CheckResult(ResultKind.SUCCESS, "http 200", latency=0.0007)),
    (HTTP, CheckResult(ResultKind.HTTP_FAILURE, "http 506", latency=0.03)),
    (HTTP, CheckResult(ResultKind.TIMEOUT, "timeout after 500ms", latency=0.5)),
    (TCP, CheckResult(ResultKind.SUCCESS, "connected", latency=0.0001)),
    (TCP, CheckResult(ResultKind.TCP_FAILURE, "connect refused", latency=7.0)),
    (TCP, CheckResult(ResultKind.SUCCESS, "connected", latency=5.0)),
]


def reference() -> bytes:
    """What the same checks give through prometheus_client's Counter and Histogram."""
    registry = CollectorRegistry()
    checks = Counter("healthplane_checks", "Health checks run by the test, by cluster and outcome (success, "
                     "http_failure, ...).", ["cluster", "outcome"], registry=registry)  # fmt: skip
    latency = Histogram("healthplane_check_latency_seconds", "Health check latency (the test), by cluster and check "
                        "type.", ["cluster", "check"], buckets=CHECK_LATENCY_BUCKETS, registry=registry)  # fmt: skip
    for target, result in CHECKS:
        checks.labels(target.cluster, result.kind.value).inc()
        latency.labels(target.cluster, target.health_check.kind).observe(result.latency)
    return exposition(registry)


def exposition(registry: CollectorRegistry) -> bytes:
    lines = generate_latest(registry).splitlines()
    return b"\n".join(sorted(line for line in lines if b"_created" not in line))


def test_per_check_counts_expose_as_prometheus_client_would() -> None:
    registry = CollectorRegistry()
    metrics = CheckMetrics(registry, who="the test")
    for target, result in CHECKS:
        metrics.on_check(target, result)
    assert exposition(registry) == reference()


def test_tallies_added_in_bulk_give_the_same() -> None:
    registry = CollectorRegistry()
    metrics = CheckMetrics(registry, who="the test")
    first, second = CheckTally(), CheckTally()
    assert first.take() is None  # nothing counted yet: nothing to send
    for i, (target, result) in enumerate(CHECKS):
        (first if i % 2 else second).on_check(target, result)
    for tally in (first, second):
        counts = tally.take()
        assert counts is not None
        metrics.add(counts)
        assert tally.take() is None  # taken: the next report starts from zero
    assert exposition(registry) == reference()
