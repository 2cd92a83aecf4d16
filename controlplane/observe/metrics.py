"""Prometheus metrics for the control plane: one registry per control plane, served at `/metrics`.

Counters on the ADS path are bound per type URL once, so a push to N streams costs N plain
increments. Gauges that describe state (endpoints by status, connected streams) are computed at
scrape time from what is served, so they can never drift from what it serves.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.observe.histograms import LoopHistogram
from controlplane.snapshots import resources as rs
from controlplane.snapshots.cache import SnapshotSource
from controlplane.snapshots.snapshot import Snapshot
from controlplane.version import version
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import PendingResponse, RequestKind, RequestOutcome, StreamState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics(StreamCallbacks):
    """The control plane's Prometheus registry and the ADS counters fed by stream callbacks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # What runs, and the process and runtime metrics every Python exporter has (process_*,
        # python_info, python_gc_*): dashboards and alerts written for them work unchanged.
        Info("healthplane_build", "The healthplane version and the Python running it.", registry=self.registry).info(
            {"version": version(), "python": platform.python_version()}
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.streams_opened = Counter(
            "healthplane_xds_streams_opened", "ADS streams that identified a node.", registry=self.registry
        )
        self.streams_closed = Counter("healthplane_xds_streams_closed", "ADS streams closed.", registry=self.registry)
        responses = Counter(
            "healthplane_xds_responses", "DiscoveryResponses sent, by type.", ["type"], registry=self.registry
        )
        acks = Counter("healthplane_xds_acks", "ACKs received, by type.", ["type"], registry=self.registry)
        nacks = Counter("healthplane_xds_nacks", "NACKs received, by type.", ["type"], registry=self.registry)
        self.versions = Counter(
            "healthplane_snapshot_versions",
            "Snapshots published, by cause (start, verdict, override, topology).",
            ["cause"],
            registry=self.registry,
        )
        # issue 5: propagation measured at the ACK (controlplane.observe.propagation), by the version's cause.
        # Observed once per node and push: a lock-free histogram (controlplane.observe.histograms).
        self.propagation_delay = LoopHistogram(
            "healthplane_propagation_delay_seconds",
            "Per node and version: the node's ACK minus the time of the version's cause.",
            "cause",
            PROPAGATION_BUCKETS,
        )
        self.convergence = LoopHistogram(
            "healthplane_convergence_seconds",
            "Per version: the last concerned node's ACK minus the time of the version's cause.",
            "cause",
            PROPAGATION_BUCKETS,
        )
        self.registry.register(self.propagation_delay)
        self.registry.register(self.convergence)
        short = rs.SHORT_NAMES
        self._responses = {t: responses.labels(short[t]) for t in rs.ADS_ORDER}
        self._acks = {t: acks.labels(short[t]) for t in rs.ADS_ORDER}
        self._nacks = {t: nacks.labels(short[t]) for t in rs.ADS_ORDER}

    def on_stream_open(self, stream: StreamState) -> None:
        self.streams_opened.inc()

    def on_stream_closed(self, stream: StreamState) -> None:
        self.streams_closed.inc()

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        if outcome.kind is RequestKind.ACK:
            self._acks[outcome.type_url].inc()
        elif outcome.kind is RequestKind.NACK:
            self._nacks[outcome.type_url].inc()

    def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
        self._responses[response.type_url].inc()

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self.versions.labels(snapshot.cause.kind).inc()

    def add_state(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register a function that yields metric families computed at scrape time."""
        self.registry.register(_StateCollector(collect))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed at scrape time; names are not known up front


def served_state(streams: Callable[[], int], snapshots: SnapshotSource) -> Iterator[Metric]:
    """Gauges read at scrape time: identified streams, endpoints by status, the served snapshot's age."""
    snapshot = snapshots.current()
    if snapshot is None:
        return
    gauge = GaugeMetricFamily("healthplane_xds_streams", "ADS streams with an identified node, now.")
    gauge.add_metric([], streams())
    yield gauge
    endpoints = GaugeMetricFamily(
        "healthplane_endpoints", "Endpoints served, by cluster and health_status.", labels=["cluster", "status"]
    )
    counts: dict[tuple[str, str], int] = {}
    for ep in snapshot.endpoints:
        key = (ep.cluster, ep.status.name)
        counts[key] = counts.get(key, 0) + 1
    for (cluster, status), n in sorted(counts.items()):
        endpoints.add_metric([cluster, status], n)
    yield endpoints
    version = GaugeMetricFamily("healthplane_snapshot_created_seconds", "When the served snapshot was built.")
    version.add_metric([], snapshot.created)
    yield version


class CallbackChain(StreamCallbacks):
    """Several `StreamCallbacks` called in order (node records, metrics, propagation)."""

    def __init__(self, callbacks: Iterable[StreamCallbacks]) -> None:
        self.callbacks = list(callbacks)

    def add(self, callbacks: StreamCallbacks) -> None:
        self.callbacks.append(callbacks)

    def on_stream_open(self, stream: StreamState) -> None:
        for cb in self.callbacks:
            cb.on_stream_open(stream)

    def on_stream_closed(self, stream: StreamState) -> None:
        for cb in self.callbacks:
            cb.on_stream_closed(stream)

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        for cb in self.callbacks:
            cb.on_request(stream, outcome)

    def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
        for cb in self.callbacks:
            cb.on_response(stream, response, snapshot)
