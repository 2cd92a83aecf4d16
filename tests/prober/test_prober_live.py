"""The Prober end to end against real backends: thresholds observed through real sockets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.health.store import HealthStatus, Verdict
from controlplane.topology.model import Cluster, Endpoint, GrpcCheck, HealthCheck, HttpCheck, TcpCheck, Topology
from prober.events import ProbeEvent
from prober.scheduler import Prober
from tests.prober.backends import LOCALHOST, GrpcHealthBackend, HttpBackend, TcpBackend, eventually


def one_endpoint(port: int, hc: HealthCheck, cluster: str = "web") -> Topology:
    return Topology(clusters=(Cluster(cluster, (Endpoint(LOCALHOST, port, health_check=hc),)),))


@dataclass
class Recorder:
    """A sink that also snapshots what the backend had served when each event arrived."""

    snapshot: Any = None
    verdicts: list[Verdict] = field(default_factory=list)
    events: list[tuple[ProbeEvent, Any]] = field(default_factory=list)

    async def on_verdict(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)

    async def on_event(self, event: ProbeEvent) -> None:
        self.events.append((event, self.snapshot() if self.snapshot else None))

    def statuses(self) -> list[HealthStatus]:
        return [v.status for v in self.verdicts]


async def test_http_506_goes_unhealthy_after_threshold_and_back(http_backend: HttpBackend, tmp_path: Path) -> None:
    hc = HealthCheck(
        kind="http", http=HttpCheck(path="/livez"), interval=0.05, timeout=0.5,
        healthy_threshold=2, unhealthy_threshold=3,
    )  # fmt: skip
    rec = Recorder(snapshot=lambda: list(http_backend.statuses_served))
    log = tmp_path / "events.jsonl"
    async with Prober(one_endpoint(http_backend.port, hc), sink=rec, event_log=log, source="prober:t"):
        await eventually(lambda: rec.statuses() == [HealthStatus.HEALTHY])
        _, seen = rec.events[0]
        assert seen == [200, 200]  # healthy_threshold successes from unknown
        http_backend.status = 506
        await eventually(lambda: len(rec.verdicts) == 2)
        event, seen = rec.events[1]
        assert (event.old, event.new, event.reason) == (HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, "http 506")
        assert event.counters.http_failures == 3
        assert seen[-4:] == [200, 506, 506, 506]  # exactly unhealthy_threshold failures
        http_backend.status = 200
        await eventually(lambda: len(rec.verdicts) == 3)
        event, seen = rec.events[2]
        assert (event.new, event.reason, event.counters.successes) == (HealthStatus.HEALTHY, "http 200", 2)
        assert seen[-3:] == [506, 200, 200]
    assert rec.statuses() == [HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.HEALTHY]
    assert all(v.source == "prober:t" and v.endpoint == f"{LOCALHOST}:{http_backend.port}" for v in rec.verdicts)
    assert http_backend.connections == 1  # every check rode one keep-alive connection
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x["new"] for x in lines] == ["HEALTHY", "UNHEALTHY", "HEALTHY"]
    assert lines[1]["reason"] == "http 506" and lines[1]["check"] == "http"


async def test_stopped_tcp_listener_goes_unhealthy() -> None:
    backend = await TcpBackend().start()
    hc = HealthCheck(kind="tcp", tcp=TcpCheck(), interval=0.05, timeout=0.5, healthy_threshold=1, tcp_failures=2)
    rec = Recorder()
    try:
        async with Prober(one_endpoint(backend.port, hc, "db"), sink=rec):
            await eventually(lambda: rec.statuses() == [HealthStatus.HEALTHY])
            await backend.stop()
            await eventually(lambda: len(rec.verdicts) == 2)
            event = rec.events[1][0]
            assert (event.new, event.reason, event.counters.tcp_failures) == (
                HealthStatus.UNHEALTHY, "connect refused", 2,
            )  # fmt: skip
            backend = await TcpBackend().start(backend.port)
            await eventually(lambda: len(rec.verdicts) == 3)
            assert rec.verdicts[2].status is HealthStatus.HEALTHY
    finally:
        await backend.stop()


async def test_grpc_not_serving_goes_unhealthy(grpc_backend: GrpcHealthBackend) -> None:
    await grpc_backend.set("orders", serving=True)
    hc = HealthCheck(
        kind="grpc", grpc=GrpcCheck(service="orders"), interval=0.05, timeout=0.5,
        healthy_threshold=1, unhealthy_threshold=2,
    )  # fmt: skip
    rec = Recorder()
    async with Prober(one_endpoint(grpc_backend.port, hc, "api"), sink=rec):
        await eventually(lambda: rec.statuses() == [HealthStatus.HEALTHY])
        await grpc_backend.set("orders", serving=False)
        await eventually(lambda: len(rec.verdicts) == 2)
        assert (rec.verdicts[1].status, rec.verdicts[1].reason) == (HealthStatus.UNHEALTHY, "grpc NOT_SERVING")
        await grpc_backend.set("orders", serving=True)
        await eventually(lambda: len(rec.verdicts) == 3)
        assert (rec.verdicts[2].status, rec.verdicts[2].reason) == (HealthStatus.HEALTHY, "grpc SERVING")


async def test_grpc_unknown_service_goes_unhealthy(grpc_backend: GrpcHealthBackend) -> None:
    hc = HealthCheck(kind="grpc", grpc=GrpcCheck(service="missing"), interval=0.05, timeout=0.5, unhealthy_threshold=2)
    rec = Recorder()
    async with Prober(one_endpoint(grpc_backend.port, hc, "api"), sink=rec):
        await eventually(lambda: len(rec.verdicts) == 1)
    assert (rec.verdicts[0].status, rec.verdicts[0].reason) == (HealthStatus.UNHEALTHY, "grpc NOT_FOUND")


async def test_hanging_backend_goes_unhealthy_by_timeouts(http_backend: HttpBackend) -> None:
    hc = HealthCheck(
        kind="http", http=HttpCheck(path="/hang"), interval=0.1, timeout=0.1, timeouts=2, initial_status="healthy",
    )  # fmt: skip
    rec = Recorder()
    async with Prober(one_endpoint(http_backend.port, hc), sink=rec) as prober:
        await eventually(lambda: len(rec.verdicts) == 2)  # the initial status, then the timeouts
        report = prober.endpoint("web", f"{LOCALHOST}:{http_backend.port}")
        assert report is not None and report.last_result is not None
        assert report.last_result.latency >= 0.1
    assert [(v.status, v.reason) for v in rec.verdicts] == [
        (HealthStatus.HEALTHY, "initial status HEALTHY"),
        (HealthStatus.UNHEALTHY, "timeout after 100ms"),
    ]
    assert rec.events[1][0].counters.timeouts == 2
