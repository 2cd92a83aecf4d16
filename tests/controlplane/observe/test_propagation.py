"""PropagationTracker driven by real StreamStates, real DiscoveryRequests and built snapshots."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.events import EventLog
from controlplane.health.store import HealthStatus
from controlplane.observe.metrics import CallbackChain
from controlplane.observe.nodes import NodeRegistry
from controlplane.observe.propagation import PropagationTracker, percentile
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Cause, Snapshot, VersionClock, build_snapshot
from controlplane.topology.parse import parse_topology_text
from controlplane.xds.stream import StreamState

CDS, EDS, LDS, RDS = rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE

TOPOLOGY = """\
clusters:
  - name: web
    endpoints:
      - {address: 127.0.0.1, port: 8081}
      - {address: 127.0.0.1, port: 8082}
  - name: api
    endpoints:
      - {address: 127.0.0.2, port: 9000}
listeners:
  - name: ingress
    port: 10000
    routes: [{prefix: /, cluster: web}]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A tracker, its clock, successive snapshots, and nodes that subscribe, receive and ACK."""

    def __init__(self, **kwargs: object) -> None:
        self.clock = Clock()
        self.delays: list[tuple[float, str]] = []
        self.convergences: list[tuple[float, str]] = []
        self.nodes = NodeRegistry(EventLog())
        self.tracker = PropagationTracker(
            streams=self.nodes,
            clock=self.clock,
            observe_delay=lambda s, c: self.delays.append((s, c)),
            observe_convergence=lambda s, c: self.convergences.append((s, c)),
            **kwargs,  # type: ignore[arg-type]
        )
        self.versions = VersionClock(epoch=1)
        self.statuses: dict[tuple[str, str], HealthStatus] = {}
        self.snapshot: Snapshot | None = None
        self.streams: dict[str, StreamState] = {}
        # The registry sees a stream before the tracker, as in the control plane's callback chain.
        self.callbacks = CallbackChain([self.nodes, self.tracker])
        self.publish(Cause("start", "", self.clock.now), None)

    def health(self, cluster: str, endpoint: str) -> HealthStatus:
        return self.statuses.get((cluster, endpoint), HealthStatus.HEALTHY)

    def publish(self, cause: Cause, dirty: list[str] | None) -> Snapshot:
        previous = self.snapshot
        topology = previous.topology if previous is not None else parse_topology_text(TOPOLOGY)
        self.snapshot = build_snapshot(
            topology, self.health, version=self.versions.next(), cause=cause, previous=previous, dirty_clusters=dirty
        )
        self.tracker.on_snapshot(self.snapshot, previous)
        return self.snapshot

    def flip(self, cluster: str, endpoint: str, *, at: float) -> Snapshot:
        self.statuses[(cluster, endpoint)] = HealthStatus.UNHEALTHY
        return self.publish(Cause("verdict", f"{cluster} {endpoint}", at), [cluster])

    def connect(self, node: str, eds: list[str]) -> StreamState:
        """A node that subscribes to CDS (wildcard) and EDS for `eds`, and has ACKed everything."""
        stream = StreamState(len(self.streams) + 1)
        first = True
        for type_url, names in ((CDS, []), (EDS, eds)):
            request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
            if first:
                request.node.CopyFrom(base_pb2.Node(id=node, cluster="svc"))
                first = False
            stream.on_request(request)
        self.callbacks.on_stream_open(stream)
        self.streams[node] = stream
        while self.send(node):  # CDS makes EDS due once more (StreamState.resend_all)
            self.ack(node)
        return stream

    def send(self, node: str) -> list[str]:
        stream = self.streams[node]
        assert self.snapshot is not None
        sent = stream.due(self.snapshot)
        for pending in sent:  # as the server stamps them, on the tracker's clock
            stream.types[pending.type_url].sent_at = self.clock.now
        return [p.type_url for p in sent]

    def ack(self, node: str, *, nack: str | None = None) -> None:
        stream = self.streams[node]
        for type_url, ts in stream.types.items():
            if not ts.awaiting_ack:
                continue
            request = discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=ts.sent_version if nack is None else (ts.acked_version or ""),
                response_nonce=ts.last_nonce,
                resource_names=sorted(ts.names),
            )
            if nack is not None:
                request.error_detail.CopyFrom(status_pb2.Status(code=3, message=nack))
            self.tracker.on_request(stream, stream.on_request(request))


def test_an_eds_only_push_is_measured_from_the_cause_to_each_ack() -> None:
    w = World()
    w.connect("a", ["web"])
    w.connect("b", ["web"])
    snap = w.flip("web", "127.0.0.1:8081", at=1000.0)
    w.clock.now = 1000.010
    assert w.send("a") == [EDS] and w.send("b") == [EDS]
    w.clock.now = 1000.050
    w.ack("a")
    record = w.tracker.get(snap.version)
    assert record is not None and record.pending == 1 and record.convergence is None
    assert w.tracker.lag("b").versions_behind == 1 and w.tracker.lag("a").versions_behind == 0
    w.clock.now = 1000.200
    w.ack("b")
    assert record.pending == 0
    assert abs((record.convergence or 0) - 0.200) < 1e-9
    assert [round(s, 3) for s, _ in w.delays] == [0.05, 0.2]
    assert w.convergences == [(record.convergence, "verdict")]
    detail = record.detail(w.clock.now)
    assert detail["not_acked"] == []
    assert [(n["node"], n["sent_ms"], n["ack_ms"]) for n in detail["per_node"]] == [
        ("a", 10.0, 50.0),
        ("b", 10.0, 200.0),
    ]


def test_nodes_a_change_does_not_reach_are_not_waited_for() -> None:
    w = World()
    w.connect("web-only", ["web"])
    w.connect("api-only", ["api"])
    snap = w.flip("api", "127.0.0.2:9000", at=1000.0)
    record = w.tracker.get(snap.version)
    assert record is not None and set(record.deliveries) == {"api-only"}
    assert w.send("web-only") == []
    w.send("api-only")
    w.ack("api-only")
    assert record.pending == 0 and record.convergence is not None


def test_a_later_version_acked_settles_the_earlier_ones() -> None:
    w = World()
    w.connect("a", ["web"])
    first = w.flip("web", "127.0.0.1:8081", at=1000.0)
    second = w.flip("web", "127.0.0.1:8082", at=1000.1)
    w.clock.now = 1000.3
    w.send("a")  # the node gets the second version directly
    w.ack("a")
    for snap in (first, second):
        record = w.tracker.get(snap.version)
        assert record is not None and record.pending == 0
    assert w.tracker.lag("a").version == second.version


def test_a_nack_is_recorded_and_leaves_the_node_behind() -> None:
    w = World()
    w.connect("a", ["web"])
    w.connect("b", ["web"])
    snap = w.flip("web", "127.0.0.1:8081", at=1000.0)
    w.send("a")
    w.send("b")
    w.clock.now = 1000.02
    w.ack("a", nack="bad endpoint")
    w.ack("b")
    record = w.tracker.get(snap.version)
    assert record is not None and record.pending == 0
    statuses = {n["node"]: (n["status"], n["error"]) for n in record.detail(w.clock.now)["per_node"]}
    assert statuses == {"a": ("nacked", "bad endpoint"), "b": ("acked", None)}
    assert w.tracker.lag("a").version != snap.version


def test_a_node_that_disconnects_is_no_longer_waited_for() -> None:
    w = World()
    stream = w.connect("a", ["web"])
    w.connect("b", ["web"])
    snap = w.flip("web", "127.0.0.1:8081", at=1000.0)
    w.send("b")
    w.ack("b")
    record = w.tracker.get(snap.version)
    assert record is not None and record.pending == 1
    assert record.detail(w.clock.now)["not_acked"] == ["a"]
    w.callbacks.on_stream_closed(stream)
    assert record.pending == 0
    assert {d.node: d.status for d in record.deliveries.values()} == {"a": "disconnected", "b": "acked"}


def test_lag_counts_versions_and_time_behind() -> None:
    w = World()
    w.connect("slow", ["web"])
    w.flip("web", "127.0.0.1:8081", at=1000.0)
    w.send("slow")  # in flight, not ACKed
    w.flip("web", "127.0.0.1:8082", at=1000.5)  # held: the first is not ACKed yet
    w.clock.now = 1002.0
    lag = w.tracker.lag("slow")
    assert lag.versions_behind == 2 and lag.behind_ms == 2000.0
    w.ack("slow")
    w.send("slow")
    w.ack("slow")
    lag = w.tracker.lag("slow")
    assert lag.versions_behind == 0 and lag.behind_ms == 0.0


def test_history_is_bounded_and_evicted_versions_stop_counting() -> None:
    w = World(limit=3)
    w.connect("stuck", ["web"])
    for i in range(5):
        w.statuses.clear()
        w.flip("web", f"127.0.0.1:808{1 + i % 2}", at=1000.0 + i)
    assert len(w.tracker.records) == 3
    assert w.tracker.lag("stuck").versions_behind == 3


def test_a_version_nobody_needs_converges_at_once_without_a_measure() -> None:
    w = World()
    record = w.tracker.recent(1)[0]
    assert record.pending == 0 and record.convergence is None and record.converged_at is not None
    assert w.convergences == []


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0


def test_an_ack_settles_its_version_whatever_the_order_of_callbacks() -> None:
    # The version an ACK names is enough: the tracker needs no on_response.
    w = World()
    w.connect("a", ["web"])
    snap = w.flip("web", "127.0.0.1:8081", at=1000.0)
    assert w.snapshot is not None
    w.streams["a"].due(w.snapshot)  # sent, but the tracker has not heard of it yet
    w.ack("a")
    record = w.tracker.get(snap.version)
    assert record is not None and record.pending == 0 and w.tracker.lag("a").version == snap.version


def test_a_response_held_by_the_model_is_sent_when_it_leaves_not_when_it_was_due() -> None:
    w = World()
    w.connect("a", ["web"])
    snap = w.flip("web", "127.0.0.1:8081", at=1000.0)
    assert w.snapshot is not None
    stream = w.streams["a"]
    due = stream.due(w.snapshot)
    stream.stamp_sent(due, None)  # as the server does while a modelled delay holds them
    record = w.tracker.get(snap.version)
    assert record is not None and record.detail(w.clock.now)["per_node"][0]["status"] == "waiting"
    w.clock.now = 1000.3
    stream.stamp_sent(due, w.clock.now)
    assert w.tracker.get(snap.version) is record and record.detail(w.clock.now)["per_node"][0]["sent_ms"] == 300.0
    w.clock.now = 1000.35
    w.ack("a")
    node = record.detail(w.clock.now)["per_node"][0]
    assert (node["status"], node["sent_ms"], node["ack_ms"]) == ("acked", 300.0, 350.0)
