"""The prober inside the control plane's process: `healthplane serve` attaches one unless --no-prober.

Its verdicts go straight into the control plane (batched like the link's), its probe events into
the control plane's event log, and its check counts and latency into the control plane's
`/metrics`. The control plane sees it only as a `controlplane.probers.sources.LocalProber`.
"""

from __future__ import annotations

from typing import Protocol

from controlplane.events import EventSink
from controlplane.health.checks import CheckInfo
from controlplane.health.store import Verdict
from controlplane.observe.metrics import Metrics
from controlplane.probers.sources import LocalProber
from controlplane.topology.model import Topology
from prober.events import ProbeEvent
from prober.metrics import CheckMetrics
from prober.scheduler import EndpointReport, Prober, TopologyChange

SOURCE = "prober:embedded"


class Host(Protocol):
    """What the embedded prober needs of its control plane (`controlplane.app.ControlPlane` is one)."""

    @property
    def topology(self) -> Topology: ...
    @property
    def events(self) -> EventSink: ...
    @property
    def metrics(self) -> Metrics: ...

    local_prober: LocalProber | None

    def submit_verdicts_soon(self, verdicts: list[Verdict]) -> None: ...


class EmbeddedProber:
    """A `Prober` created at start on the control plane's current topology; a `LocalProber`."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.prober: Prober | None = None
        self.metrics = CheckMetrics(host.metrics.registry)

    @property
    def source(self) -> str:
        return SOURCE

    @property
    def running(self) -> bool:
        return self.prober is not None

    async def start(self) -> None:
        self.prober = Prober(self.host.topology, sink=_Sink(self.host), source=SOURCE)
        self.prober.check_listeners.append(self.metrics.on_check)
        await self.prober.start()

    async def aclose(self) -> None:
        if self.prober is not None:
            await self.prober.aclose()

    def update_topology(self, topology: Topology) -> TopologyChange | None:
        return None if self.prober is None else self.prober.update_topology(topology)

    def check_info(self, cluster: str, endpoint: str) -> CheckInfo | None:
        report = None if self.prober is None else self.prober.endpoint(cluster, endpoint)
        return None if report is None else check_info_from_report(report, SOURCE)

    def unchecked(self) -> int:
        prober = self.prober
        if prober is None:
            return 0
        return sum(1 for k in prober.endpoints() if (r := prober.endpoint(*k)) is not None and r.checks == 0)


def attach_embedded_prober(host: Host) -> EmbeddedProber:
    """Give `host` a prober of its own, started and stopped with it."""
    embedded = EmbeddedProber(host)
    host.local_prober = embedded
    return embedded


def check_info_from_report(report: EndpointReport, source: str) -> CheckInfo:
    """A `prober.scheduler.EndpointReport` as a CheckInfo."""
    hc = report.target.health_check
    c = report.counters
    last = report.last_result
    return CheckInfo(
        check=hc.kind,
        rise=hc.healthy_threshold,
        fall=hc.unhealthy_threshold,
        successes=c.successes,
        http_failures=c.http_failures,
        tcp_failures=c.tcp_failures,
        timeouts=c.timeouts,
        checks=report.checks,
        last_result=None if last is None else last.kind.value,
        last_reason="" if last is None else last.reason,
        last_time=None if last is None else last.time,
        last_latency=None if last is None else last.latency,
        prober=source,
    )


class _Sink:
    """The embedded prober's verdicts and events, straight into this process's control plane."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def on_verdict(self, verdict: Verdict) -> None:
        self.host.submit_verdicts_soon([verdict])

    async def on_event(self, event: ProbeEvent) -> None:
        self.host.events.record(
            "probe",
            f"{event.cluster} {event.endpoint}: {event.old.name} -> {event.new.name} ({event.reason})",
            cluster=event.cluster,
            endpoint=event.endpoint,
            reason=event.reason,
            source=event.source,
            counters=event.counters.to_json(),
            latency=event.latency,
        )
