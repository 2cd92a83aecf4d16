"""The xDS workers' pure parts: snapshots as handed to a worker, and the main process's mirror of
a worker's streams, which must read exactly as the worker's own (`/nodes`, CSDS, propagation)."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.health.store import HealthStatus
from controlplane.observe.metrics import CallbackChain
from controlplane.observe.nodes import node_view
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Snapshot
from controlplane.xds.csds import client_config
from controlplane.xds.delta import DeltaStreamState
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import PendingResponse, RequestKind, RequestOutcome, StreamState
from controlplane.xds.workers.mirror import Mirror
from controlplane.xds.workers.records import Record, Recorder
from controlplane.xds.workers.wire import SnapshotDecoder, encode_snapshot
from tests.controlplane.xds.test_stream import TOPOLOGY, WITHOUT_API, Fleet

# --------------------------------------------------------------------------- snapshots down


def frame_of(snapshot: Snapshot, base: Snapshot | None) -> Any:
    kind, frame = pickle.loads(encode_snapshot(snapshot, base))
    assert kind == "snapshot"
    return frame


def assert_serves_the_same(ours: Snapshot, theirs: Snapshot) -> None:
    assert theirs.version == ours.version and dict(theirs.type_versions) == dict(ours.type_versions)
    assert theirs.cause == ours.cause and theirs.topology == ours.topology
    for type_url, table in ours.resources.items():
        assert list(theirs.resources[type_url]) == list(table)
        names = tuple(table)
        assert theirs.response_body(type_url, names) == ours.response_body(type_url, names)
        assert theirs.delta_response_body(type_url, names, ("gone",)) == ours.delta_response_body(
            type_url, names, ("gone",)
        )
        for name, resource in table.items():
            assert theirs.resources[type_url][name].version == resource.version
            assert theirs.resources[type_url][name].delta_version == resource.delta_version


def test_a_worker_serves_the_very_bytes_of_each_snapshot() -> None:
    fleet, decoder = Fleet(), SnapshotDecoder()
    assert_serves_the_same(fleet.snapshot, decoder.decode(frame_of(fleet.snapshot, None)))
    for change in (
        lambda: fleet.flip("web", "127.0.0.1:8081"),
        lambda: fleet.edit(WITHOUT_API),
        lambda: fleet.edit(TOPOLOGY),
    ):
        previous = fleet.snapshot
        snapshot = change()
        assert_serves_the_same(snapshot, decoder.decode(frame_of(snapshot, previous)))


def test_a_health_change_carries_one_resource_and_no_topology() -> None:
    fleet, decoder = Fleet(), SnapshotDecoder()
    before = decoder.decode(frame_of(fleet.snapshot, None))
    previous = fleet.snapshot
    frame = frame_of(fleet.flip("web", "127.0.0.1:8082"), previous)
    assert frame.base == previous.version and frame.topology is None
    changed = {t: [r[0] for r in changed] for t, (names, changed) in frame.tables.items() if changed}
    assert changed == {rs.ENDPOINT: ["web"]}
    assert all(names is None for names, _ in frame.tables.values())
    after = decoder.decode(frame)
    # Unchanged resources are the worker's same objects: delta streams diff snapshots by identity.
    assert after.resources[rs.CLUSTER]["web"] is before.resources[rs.CLUSTER]["web"]
    assert after.resources[rs.ENDPOINT]["api"] is before.resources[rs.ENDPOINT]["api"]
    assert after.resources[rs.ENDPOINT]["web"] is not before.resources[rs.ENDPOINT]["web"]


def test_a_frame_for_another_base_is_refused() -> None:
    fleet, decoder = Fleet(), SnapshotDecoder()
    first = fleet.snapshot
    second = fleet.flip("web", "127.0.0.1:8081")
    third = fleet.flip("web", "127.0.0.1:8082")
    decoder.decode(frame_of(first, None))
    with pytest.raises(ValueError, match="relative to"):
        decoder.decode(frame_of(third, second))


# --------------------------------------------------------------------------- records up


class Log(StreamCallbacks):
    """The callbacks as the views receive them, in order, by what they carry."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.opened: set[int] = set()

    def on_stream_open(self, stream: StreamState) -> None:
        self.opened.add(stream.stream_id)
        self.calls.append(("open", stream.stream_id, stream.node_key, stream.protocol))

    def on_stream_closed(self, stream: StreamState) -> None:
        self.calls.append(("closed", stream.stream_id))

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        if stream.stream_id not in self.opened:
            # Before its open a stream was sent nothing, so it can only subscribe; its open carries that.
            assert outcome.kind in (RequestKind.SUBSCRIBE, RequestKind.UNSUPPORTED)
            return
        self.calls.append(("request", stream.stream_id, outcome))

    def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
        self.calls.append(("response", stream.stream_id, response, snapshot.version))


class Node:
    """A node driving one stream at random (subscribe, ACK, NACK, stale nonces), as a server would."""

    def __init__(self, stream: StreamState, rng: random.Random, callbacks: StreamCallbacks) -> None:
        self.stream, self.rng, self.callbacks = stream, rng, callbacks
        self.delta = isinstance(stream, DeltaStreamState)
        self.opened = False
        self.in_flight: dict[str, PendingResponse] = {}
        self.versions: dict[str, str] = {}

    def request(self, type_url: str, *, names: list[str] | None, answer: PendingResponse | None, nack: bool) -> None:
        node = base_pb2.Node(id=f"n{self.stream.stream_id}", cluster=self.rng.choice(["front", "sidecar"]))
        error = status_pb2.Status(code=3, message="bad") if nack else None
        message: Any
        if self.delta:
            message = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
            if names is not None:
                message.resource_names_subscribe.extend(names)
                if self.rng.random() < 0.3:
                    message.resource_names_unsubscribe.append(self.rng.choice(["web", "api", "*", "public"]))
            if answer is not None:
                message.response_nonce = answer.nonce
        else:
            message = discovery_pb2.DiscoveryRequest(type_url=type_url)
            message.resource_names.extend(names if names is not None else [])
            if answer is not None:
                message.response_nonce = answer.nonce
                message.version_info = self.versions.get(type_url, "") if nack else answer.version
        if error is not None:
            message.error_detail.CopyFrom(error)
        if self.stream.node_id is None:
            message.node.CopyFrom(node)
        outcome = self.stream.on_request(message)
        if outcome.kind in (RequestKind.ACK,):
            self.versions[type_url] = answer.version if answer is not None else ""
        self.callbacks.on_request(self.stream, outcome)
        if not self.opened and self.stream.identified:
            self.opened = True
            self.callbacks.on_stream_open(self.stream)

    def step(self, snapshot: Snapshot) -> None:
        roll = self.rng.random()
        type_url = self.rng.choice(rs.ADS_ORDER)
        answer = self.in_flight.get(type_url)
        if roll < 0.35 or type_url not in self.stream.types:
            names = self.rng.sample(["web", "api", "ingress", "public", "nope"], self.rng.randint(0, 3))
            self.request(type_url, names=names, answer=None, nack=False)
        elif answer is not None and roll < 0.85:
            self.in_flight.pop(type_url)
            self.request(type_url, names=None, answer=answer, nack=roll > 0.75)
        elif answer is not None:  # a stale nonce
            self.request(type_url, names=None, answer=PendingResponse(type_url, "0", (), "999"), nack=False)
        if self.opened and self.stream.needs_due(snapshot):
            for pending in self.stream.due(snapshot):
                self.callbacks.on_response(self.stream, pending, snapshot)
                self.in_flight[pending.type_url] = pending


@pytest.mark.parametrize("seed", range(6))
def test_the_mirror_reads_as_the_workers_streams(seed: int) -> None:
    rng = random.Random(seed)
    fleet = Fleet()
    history = [fleet.snapshot]
    batch: list[Record] = []
    worker_log, main_log = Log(), Log()
    recorder = Recorder(batch.append)
    mirror = Mirror(main_log, lambda v: next((s for s in history if s.version == v), None))
    streams = [
        (DeltaStreamState if i % 2 else StreamState)(1_000_000_001 + i, peer=f"ipv4:127.0.0.1:{4000 + i}")
        for i in range(4)
    ]
    nodes = [Node(s, rng, CallbackChain([worker_log, recorder])) for s in streams]
    for step in range(400):
        if rng.random() < 0.05:
            status = rng.choice([HealthStatus.UNHEALTHY, HealthStatus.HEALTHY])
            history.append(fleet.flip(rng.choice(["web", "api"]), "127.0.0.1:8081", status))
        elif rng.random() < 0.01:
            history.append(fleet.edit(rng.choice([TOPOLOGY, WITHOUT_API])))
        rng.choice(nodes).step(fleet.snapshot)
        if rng.random() < 0.3 or step == 399:
            mirror.apply(0, pickle.loads(pickle.dumps(batch)))
            batch.clear()
            assert main_log.calls == worker_log.calls
            for stream in streams:
                if stream.stream_id not in mirror.streams:
                    assert stream.node_id is None or not stream.identified
                    continue
                copy = mirror.streams[stream.stream_id]
                assert node_view(copy, fleet.snapshot) == node_view(stream, fleet.snapshot)
                assert client_config(copy, history) == client_config(stream, history)
    assert any(call[0] == "response" for call in main_log.calls)
    assert any(call[0] == "request" and call[2].kind is RequestKind.NACK for call in main_log.calls)
    for stream in streams:
        recorder.on_stream_closed(stream)
    mirror.apply(0, batch)
    assert mirror.streams == {}


def test_a_gone_worker_closes_its_streams_in_the_views() -> None:
    log = Log()
    mirror = Mirror(log, lambda v: None)
    batch: list[Record] = []
    recorder = Recorder(batch.append)
    stream = StreamState(7, peer="ipv4:127.0.0.1:1")
    stream.on_request(discovery_pb2.DiscoveryRequest(type_url=rs.CLUSTER, node=base_pb2.Node(id="e1", cluster="c")))
    recorder.on_stream_open(stream)
    mirror.apply(3, batch)
    assert mirror.of(3) == 1 and mirror.streams[7].types[rs.CLUSTER].wildcard
    assert mirror.drop(3) == 1
    assert log.calls == [("open", 7, "e1", "sotw"), ("closed", 7)]
    assert mirror.streams == {} and mirror.owner == {}
