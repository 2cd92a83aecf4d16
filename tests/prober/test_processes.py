"""A prober across processes (ShardedProber): real worker processes and real backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from controlplane.health.store import HealthStatus, Verdict
from controlplane.topology.parse import parse_topology
from prober.events import ProbeEvent, QueueSink
from prober.link import merge_shares
from prober.metrics import CheckMetrics
from prober.processes import ShardedProber
from prober.shards import shard_of
from tests.prober.backends import LOCALHOST, HttpBackend, eventually

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def backends() -> AsyncIterator[list[HttpBackend]]:
    started = [await HttpBackend().start() for _ in range(6)]
    try:
        yield started
    finally:
        for b in started:
            await b.stop()


def document(backends: list[HttpBackend]) -> dict[str, object]:
    hc = {"http": {"path": "/livez"}, "interval": 0.1, "timeout": 0.1, "healthy_threshold": 1, "unhealthy_threshold": 1}
    return {
        "clusters": [
            {"name": "web", "health_check": hc, "endpoints": [{"address": LOCALHOST, "port": b.port} for b in backends]}
        ]
    }


async def test_two_processes_check_every_endpoint_once_and_report_as_one(backends: list[HttpBackend]) -> None:
    keys = [f"{LOCALHOST}:{b.port}" for b in backends]
    if len({shard_of(k, 2) for k in keys}) < 2:
        pytest.skip("the ephemeral ports all hashed to one shard")
    sink = QueueSink()
    prober = ShardedProber(2, parse_topology(document(backends)), sink=sink, source="prober:test", report_interval=0.1)
    async with prober:
        await eventually(lambda: all(b.statuses_served for b in backends), within=30)
        await eventually(
            lambda: all((r := prober.endpoint("web", k)) is not None and r.checks >= 3 for k in keys), within=10
        )
        assert {v.status for v in prober.current_verdicts()} == {HealthStatus.HEALTHY}
        assert {v.source for v in prober.current_verdicts()} == {"prober:test"}
        assert prober.stats().checks_started >= 3 * len(backends)
        # Each endpoint is checked by one process: one connection each, kept alive.
        assert all(b.connections == 1 for b in backends)

        # A failure in one shard comes back through the parent as a verdict and an event.
        backends[0].status = 506
        seen: list[Verdict | ProbeEvent] = []

        async def failed() -> bool:
            while not sink.queue.empty():
                seen.append(sink.queue.get_nowait())
            return any(
                isinstance(i, Verdict) and i.endpoint == keys[0] and i.status is HealthStatus.UNHEALTHY for i in seen
            )

        await eventually(failed, within=10)
        assert any(isinstance(i, ProbeEvent) and i.reason == "http 506" for i in seen)
        await eventually(lambda: prober.endpoint("web", keys[0]).status is HealthStatus.UNHEALTHY)  # type: ignore[union-attr]

        # A topology change reaches the workers: the removed endpoint is no longer checked.
        prober.update_topology(parse_topology(document(backends[1:])))
        assert prober.endpoint("web", keys[0]) is None
        served = len(backends[0].requests)
        await asyncio.sleep(0.5)  # several intervals: a removed endpoint must see no new check
        assert len(backends[0].requests) <= served + 1  # at most the check already in flight


async def test_a_worker_that_dies_is_started_again(backends: list[HttpBackend]) -> None:
    prober = ShardedProber(2, parse_topology(document(backends)), report_interval=0.1)
    async with prober:
        await eventually(lambda: prober.stats().checks_started > 0, within=30)
        victim = prober._workers[0].process
        victim.kill()
        await eventually(lambda: prober._workers[0].process is not victim, within=10)
        before = [len(b.requests) for b in backends]
        await eventually(lambda: all(len(b.requests) > n for b, n in zip(backends, before, strict=True)), within=30)


async def test_the_workers_check_counts_reach_the_parents_metrics(backends: list[HttpBackend]) -> None:
    registry = CollectorRegistry()
    metrics = CheckMetrics(registry, who="the test")
    prober = ShardedProber(2, parse_topology(document(backends)), report_interval=0.1)
    prober.tally_listeners.append(metrics.add)

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    async with prober:
        await eventually(lambda: sample("healthplane_checks_total", cluster="web", outcome="success") >= 12, within=30)
        await eventually(lambda: prober.stats().checks_started >= 24, within=10)
        stats = prober.stats()
        # Let the reports that follow these stats arrive: every check counted once, none twice.
        await asyncio.sleep(0.5)
        await prober.aclose()
    checks = sample("healthplane_checks_total", cluster="web", outcome="success")
    timed = sample("healthplane_check_latency_seconds_count", cluster="web", check="http")
    assert stats.checks_started - 2 * len(backends) <= checks <= prober.stats().checks_started
    assert timed == checks
    assert 0 < sample("healthplane_check_latency_seconds_sum", cluster="web", check="http") < checks * 0.1
    assert sample("healthplane_check_latency_seconds_bucket", cluster="web", check="http", le="+Inf") == checks


async def test_a_topology_without_a_document_is_checked_too(backends: list[HttpBackend]) -> None:
    # As prober/link.py's union of the control-plane replicas' shares: built, not parsed.
    topology = merge_shares([parse_topology(document(backends[:3])), parse_topology(document(backends[3:]))])
    assert not topology.document
    async with ShardedProber(2, topology, report_interval=0.1) as prober:
        await eventually(lambda: all(b.statuses_served for b in backends), within=30)
        await eventually(lambda: {v.status for v in prober.current_verdicts()} == {HealthStatus.HEALTHY}, within=10)
