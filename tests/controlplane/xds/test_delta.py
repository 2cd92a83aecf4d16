"""DeltaStreamState: subscriptions, wildcard, removals, initial versions, ACK/NACK, driven by
hand-built DeltaDiscoveryRequests against real snapshots.

Every response is decoded from the bytes the server would write (`DeltaStream.send`), and the
protocol rules are asserted on each: nonces grow, one response per type is in flight, types
come in ADS order, each resource carries the digest of its own bytes as its version.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.errors import ProtocolError
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Snapshot, content_version, encode_response
from controlplane.xds.delta import DeltaStreamState
from controlplane.xds.stream import RequestKind, RequestOutcome
from tests.controlplane.xds.test_stream import TOPOLOGY, WITHOUT_API, Fleet

CDS, EDS, LDS, RDS = rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE
NODE = base_pb2.Node(id="n1", cluster="front")


def delta(
    type_url: str,
    subscribe: Iterable[str] = (),
    unsubscribe: Iterable[str] = (),
    *,
    nonce: str = "",
    initial: dict[str, str] | None = None,
    node: base_pb2.Node | None = None,
    error: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    message = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if node is not None:
        message.node.CopyFrom(node)
    if error is not None:
        message.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return message


class DeltaStream:
    """A DeltaStreamState with the protocol rules checked on every response it sends."""

    def __init__(self) -> None:
        self.state = DeltaStreamState(1)
        self.last_nonce = 0
        self.in_flight: dict[str, str] = {}
        self.holds: dict[str, dict[str, str]] = {}  # type -> name -> version, as the node sees it

    def request(self, message: discovery_pb2.DeltaDiscoveryRequest) -> RequestOutcome:
        if self.state.node_id is None and not message.HasField("node"):
            message.node.CopyFrom(NODE)
        outcome = self.state.on_request(message)
        if outcome.kind in (RequestKind.ACK, RequestKind.NACK):
            self.in_flight.pop(outcome.type_url, None)
        return outcome

    def send(self, snapshot: Snapshot) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        out = []
        order = []
        for pending in self.state.due(snapshot):
            nonce = int(pending.nonce)
            assert nonce > self.last_nonce
            self.last_nonce = nonce
            assert pending.type_url not in self.in_flight, "two responses of one type in flight"
            self.in_flight[pending.type_url] = pending.nonce
            order.append(rs.ADS_ORDER.index(pending.type_url))
            wire = encode_response(self.state.response_body(snapshot, pending), pending.nonce)
            response = discovery_pb2.DeltaDiscoveryResponse.FromString(wire)
            assert response.nonce == pending.nonce and response.type_url == pending.type_url
            assert response.system_version_info == snapshot.type_versions[pending.type_url]
            holds = self.holds.setdefault(pending.type_url, {})
            for resource in response.resources:
                assert resource.resource.type_url == pending.type_url
                assert resource.version == content_version(pending.type_url, resource.resource.value)
                holds[resource.name] = resource.version
            assert not set(response.removed_resources) & {r.name for r in response.resources}
            for name in response.removed_resources:
                holds.pop(name, None)
            out.append(response)
        assert order == sorted(order), "responses out of ADS order"
        return out

    def ack(self, response: discovery_pb2.DeltaDiscoveryResponse, **kwargs: object) -> RequestOutcome:
        return self.request(delta(response.type_url, nonce=response.nonce, **kwargs))  # type: ignore[arg-type]


def names(response: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in response.resources)


def connect(fleet: Fleet, stream: DeltaStream | None = None) -> DeltaStream:
    """A delta node that subscribes the way Envoy does: wildcard CDS/LDS, then named EDS/RDS."""
    stream = stream or DeltaStream()
    stream.request(delta(CDS))
    [cds] = stream.send(fleet.snapshot)
    stream.request(delta(EDS, names(cds)))
    stream.ack(cds)
    [eds] = stream.send(fleet.snapshot)
    stream.ack(eds)
    stream.request(delta(LDS))
    [lds] = stream.send(fleet.snapshot)
    stream.request(delta(RDS, names(lds)))
    stream.ack(lds)
    [rds] = stream.send(fleet.snapshot)
    stream.ack(rds)
    assert stream.send(fleet.snapshot) == []
    return stream


def test_initial_subscriptions_get_every_resource_once() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    assert stream.holds[CDS].keys() == {"web", "api"}
    assert stream.holds[EDS].keys() == {"web", "api"}
    assert stream.holds[LDS].keys() == {"ingress", "public"}  # NODE.cluster is "front"
    assert stream.holds[RDS].keys() == {"ingress", "public"}
    for type_url, held in stream.holds.items():
        table = fleet.snapshot.resources[type_url]
        assert held == {n: table[n].delta_version for n in held}
        assert stream.state.types[type_url].acked_version == fleet.snapshot.type_versions[type_url]


def test_listeners_for_other_nodes_are_not_sent_and_an_empty_response_moves_the_version() -> None:
    fleet = Fleet()
    stream = DeltaStream()
    stream.request(delta(LDS, node=base_pb2.Node(id="n2", cluster="back")))
    [lds] = stream.send(fleet.snapshot)
    assert names(lds) == ["ingress"]
    stream.ack(lds)
    # Only the "public" listener (not for "back") changes: nothing to send, but the type version moved.
    fleet.edit(TOPOLOGY.replace("port: 10001", "port: 10002"))
    [empty] = stream.send(fleet.snapshot)
    assert list(empty.resources) == [] and list(empty.removed_resources) == []
    assert stream.ack(empty).version == fleet.snapshot.type_versions[LDS]


def test_health_change_sends_only_that_load_assignment() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    fleet.flip("web", "127.0.0.1:8081")
    [eds] = stream.send(fleet.snapshot)
    assert eds.type_url == EDS and names(eds) == ["web"]
    assert eds.resources[0].version == fleet.snapshot.resources[EDS]["web"].delta_version
    outcome = stream.ack(eds)
    assert outcome.kind is RequestKind.ACK and outcome.version == fleet.snapshot.type_versions[EDS]
    assert stream.send(fleet.snapshot) == []


def test_added_cluster_is_sent_alone_and_its_endpoints_on_subscription() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    fleet.edit(
        TOPOLOGY.replace("listeners:", "  - name: extra\n    endpoints: [{address: 127.0.0.3, port: 1}]\nlisteners:")
    )
    [cds] = stream.send(fleet.snapshot)
    assert names(cds) == ["extra"] and list(cds.removed_resources) == []
    stream.request(delta(EDS, ["extra"]))
    stream.ack(cds)
    [eds] = stream.send(fleet.snapshot)
    assert names(eds) == ["extra"]


def test_updated_cluster_is_followed_by_its_load_assignment() -> None:
    """Envoy re-creates an updated cluster and waits for its endpoints; no request asks for them."""
    fleet = Fleet()
    stream = connect(fleet)
    fleet.edit(TOPOLOGY.replace("  - name: web\n", "  - name: web\n    connect_timeout: 2s\n"))
    cds, eds = stream.send(fleet.snapshot)
    assert (cds.type_url, names(cds)) == (CDS, ["web"])
    assert (eds.type_url, names(eds)) == (EDS, ["web"])


def test_removed_cluster_listener_route_and_assignment_are_announced() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    fleet.edit(WITHOUT_API)
    cds, eds, lds, rds = stream.send(fleet.snapshot)
    assert list(cds.removed_resources) == ["api"] and names(cds) == []
    assert list(eds.removed_resources) == ["api"]
    assert sorted(lds.removed_resources) == ["ingress", "public"]
    assert sorted(rds.removed_resources) == ["ingress", "public"]
    # Envoy then unsubscribes; nothing more is due.
    stream.request(delta(EDS, unsubscribe=["api"], nonce=eds.nonce))
    stream.request(delta(RDS, unsubscribe=["ingress", "public"], nonce=rds.nonce))
    stream.ack(cds)
    stream.ack(lds)
    assert stream.send(fleet.snapshot) == []
    assert stream.state.types[EDS].names == {"web"}


def test_missing_names_are_answered_as_removed_then_sent_when_they_appear() -> None:
    fleet = Fleet(WITHOUT_API)
    stream = DeltaStream()
    stream.request(delta(EDS, ["web", "api"]))
    [eds] = stream.send(fleet.snapshot)
    assert names(eds) == ["web"] and list(eds.removed_resources) == ["api"]
    stream.ack(eds)
    fleet.flip("web", "127.0.0.1:8081")  # an unrelated change does not repeat the removal
    [eds] = stream.send(fleet.snapshot)
    assert names(eds) == ["web"] and list(eds.removed_resources) == []
    stream.ack(eds)
    fleet.edit(TOPOLOGY)
    [eds] = stream.send(fleet.snapshot)
    assert names(eds) == ["api"]


def test_explicit_wildcard_and_names_beside_it() -> None:
    fleet = Fleet()
    stream = DeltaStream()
    stream.request(delta(CDS, ["*", "api"]))
    [cds] = stream.send(fleet.snapshot)
    assert names(cds) == ["api", "web"]
    stream.ack(cds)
    # Unsubscribing the wildcard keeps the explicitly named cluster; nothing is resent.
    stream.request(delta(CDS, unsubscribe=["*"]))
    assert stream.send(fleet.snapshot) == []
    fleet.edit(TOPOLOGY.replace("port: 8082", "port: 8083").replace("port: 9000", "port: 9001"))
    [cds_or_eds] = [r for r in stream.send(fleet.snapshot) if r.type_url == CDS] or [None]
    assert cds_or_eds is None  # only endpoints changed: clusters are the same bytes


def test_legacy_wildcard_ends_with_a_name_of_its_own() -> None:
    fleet = Fleet()
    stream = DeltaStream()
    stream.request(delta(CDS))
    [cds] = stream.send(fleet.snapshot)
    assert names(cds) == ["api", "web"]
    assert stream.state.types[CDS].wildcard
    stream.request(delta(CDS, ["web"], nonce=cds.nonce))
    ts = stream.state.types[CDS]
    assert not ts.wildcard and ts.names == {"web"}
    [again] = stream.send(fleet.snapshot)  # subscribing again asks for it again
    assert names(again) == ["web"]


def test_resubscribing_a_held_name_resends_it() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    stream.request(delta(EDS, ["web"]))
    [eds] = stream.send(fleet.snapshot)
    assert names(eds) == ["web"]


def test_initial_versions_send_only_what_differs() -> None:
    fleet = Fleet()
    first = connect(fleet)
    held = {t: dict(v) for t, v in first.holds.items()}
    # Meanwhile: one endpoint's health changed, and cluster api went away (with its listener).
    fleet.flip("web", "127.0.0.1:8081")
    fleet.edit(WITHOUT_API)
    stream = DeltaStream()
    stream.request(delta(CDS, initial=held[CDS]))
    [cds] = stream.send(fleet.snapshot)
    assert names(cds) == [] and list(cds.removed_resources) == ["api"]
    stream.request(delta(EDS, ["web"], initial={"web": held[EDS]["web"]}))
    stream.ack(cds)
    [eds] = stream.send(fleet.snapshot)
    assert names(eds) == ["web"]  # its health changed
    stream.ack(eds)
    stream.request(delta(LDS, initial=held[LDS]))
    [lds] = stream.send(fleet.snapshot)
    assert names(lds) == [] and sorted(lds.removed_resources) == ["ingress", "public"]


def test_initial_versions_match_across_a_restart() -> None:
    """Another process (another VersionClock epoch) builds the same bytes: the same versions."""
    before = connect(Fleet())
    after = Fleet()
    after.clock.epoch = 999
    after.edit(TOPOLOGY)
    stream = DeltaStream()
    stream.request(delta(CDS, initial=before.holds[CDS]))
    [cds] = stream.send(after.snapshot)
    assert names(cds) == [] and list(cds.removed_resources) == []  # an empty first answer
    stream.request(delta(EDS, ["web", "api"], initial=before.holds[EDS]))
    stream.ack(cds)
    [eds] = stream.send(after.snapshot)
    assert names(eds) == [] and list(eds.removed_resources) == []
    assert stream.state.types[EDS].sent == {n: r.version for n, r in after.snapshot.resources[EDS].items()}


def test_nack_is_recorded_and_not_answered_by_resending() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    acked = stream.state.types[CDS].acked_version
    fleet.edit(TOPOLOGY.replace("  - name: web\n", "  - name: web\n    connect_timeout: 2s\n"))
    cds, eds = stream.send(fleet.snapshot)
    outcome = stream.ack(cds, error="bad cluster")
    assert outcome.kind is RequestKind.NACK and outcome.error == "bad cluster"
    assert outcome.version == acked  # what the node keeps
    ts = stream.state.types[CDS]
    assert ts.last_nack is not None and ts.last_nack.version == fleet.snapshot.type_versions[CDS]
    stream.ack(eds)
    assert stream.send(fleet.snapshot) == []
    fleet.flip("web", "127.0.0.1:8081")
    assert [r.type_url for r in stream.send(fleet.snapshot)] == [EDS]


def test_one_response_in_flight_and_stale_nonces() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    fleet.flip("web", "127.0.0.1:8081")
    [first] = stream.send(fleet.snapshot)
    fleet.flip("api", "127.0.0.2:9000")
    assert stream.send(fleet.snapshot) == []  # held until the ACK
    assert stream.state.needs_due(fleet.snapshot) is False
    stale = stream.request(delta(EDS, nonce="1"))
    assert stale.kind is RequestKind.STALE
    assert stream.ack(first).kind is RequestKind.ACK
    assert stream.state.needs_due(fleet.snapshot)
    [second] = stream.send(fleet.snapshot)
    assert names(second) == ["api"]
    assert stream.ack(first).kind is RequestKind.STALE  # answered already


def test_the_ack_of_a_response_that_carried_the_latest_needs_no_second_look() -> None:
    # A cluster added: the CDS response is in flight when the EDS subscription comes, and each
    # ACK then answers a response that already carried this snapshot: no pass over the types.
    fleet = Fleet()
    stream = connect(fleet)
    fleet.edit(TOPOLOGY.replace("listeners:", "  - name: extra\n    endpoints: []\nlisteners:"))
    [cds] = stream.send(fleet.snapshot)
    stream.request(delta(EDS, ["extra"]))
    [eds] = stream.send(fleet.snapshot)
    assert stream.ack(cds).kind is RequestKind.ACK
    assert stream.state.needs_due(fleet.snapshot) is False
    assert stream.ack(eds).kind is RequestKind.ACK
    assert stream.state.needs_due(fleet.snapshot) is False
    assert stream.send(fleet.snapshot) == []  # and indeed nothing is due


def test_a_held_type_whose_names_changed_in_flight_needs_a_second_look() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    fleet.edit(TOPOLOGY.replace("  - name: web\n", "  - name: web\n    connect_timeout: 2s\n"))
    cds, eds = stream.send(fleet.snapshot)  # the updated cluster's endpoints follow it
    stream.ack(cds)
    fleet.edit(TOPOLOGY.replace("  - name: web\n", "  - name: web\n    connect_timeout: 3s\n"))
    [again] = stream.send(fleet.snapshot)
    assert (again.type_url, names(again)) == (CDS, ["web"])
    # Updated again while EDS is in flight (the same EDS type version): its load assignment goes
    # out again after the ACK, or the re-created cluster would stay warming.
    assert fleet.snapshot.type_versions[EDS] == stream.state.types[EDS].sent_version
    assert stream.ack(eds).kind is RequestKind.ACK
    assert stream.state.needs_due(fleet.snapshot)
    [eds2] = stream.send(fleet.snapshot)
    assert names(eds2) == ["web"]


def test_subscription_change_on_a_stale_nonce_still_applies() -> None:
    fleet = Fleet()
    stream = connect(fleet)
    stream.request(delta(EDS, unsubscribe=["api"], nonce="1"))
    assert stream.state.types[EDS].names == {"web"}
    assert "api" not in stream.state.types[EDS].sent


def test_unsupported_type_and_missing_node() -> None:
    state = DeltaStreamState(1)
    with pytest.raises(ProtocolError, match="first request on a stream must carry node"):
        state.on_request(delta(CDS))
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert state.on_request(delta(secret, node=NODE)).kind is RequestKind.UNSUPPORTED
    with pytest.raises(ProtocolError, match="type_url is empty"):
        state.on_request(delta(""))


def test_full_state_and_per_resource_views_match_a_sotw_stream() -> None:
    """The views (GET /nodes, CSDS) read the same fields: sent holds snapshot versions."""
    fleet = Fleet()
    stream = connect(fleet)
    for type_url, ts in stream.state.types.items():
        table = fleet.snapshot.resources[type_url]
        assert ts.sent == {n: table[n].version for n in ts.sent}
    assert stream.state.protocol == "delta"


def test_each_resource_is_encoded_once_and_shared() -> None:
    fleet = Fleet()
    a, b = connect(fleet), connect(fleet)
    fleet.flip("web", "127.0.0.1:8081", HealthStatus.HEALTHY)
    [ra] = a.state.due(fleet.snapshot)
    [rb] = b.state.due(fleet.snapshot)
    assert a.state.response_body(fleet.snapshot, ra) is b.state.response_body(fleet.snapshot, rb)


def test_initial_versions_of_names_not_subscribed_are_ignored() -> None:
    fleet = Fleet()
    held = connect(fleet).holds[EDS]
    stream = DeltaStream()
    stream.request(delta(EDS, ["web"], initial={**held, "gone": "x"}))
    [eds] = stream.send(fleet.snapshot)
    assert names(eds) == [] and list(eds.removed_resources) == []
    assert stream.state.types[EDS].sent == {"web": fleet.snapshot.resources[EDS]["web"].version}


def test_a_resource_delta_entry_is_built_once_and_shared_by_later_snapshots() -> None:
    fleet = Fleet()
    web = fleet.snapshot.resources[EDS]["web"]
    entry = web.delta_field
    assert web.delta_field is entry and web.delta_version == content_version(EDS, web.serialized)
    fleet.flip("api", "127.0.0.2:9000")  # web unchanged: the same resource, the same bytes
    assert fleet.snapshot.resources[EDS]["web"].delta_field is entry
    assert fleet.snapshot.resources[EDS]["api"].delta_version != Fleet().snapshot.resources[EDS]["api"].delta_version


def test_csds_shows_a_delta_nodes_resources_at_the_versions_it_holds() -> None:
    from controlplane.xds.csds import client_config

    fleet = Fleet()
    stream = connect(fleet)
    config = client_config(stream.state, [fleet.snapshot])
    shown = {(c.type_url, c.name): c.version_info for c in config.generic_xds_configs}
    held = {(t, n): v for t, names in stream.holds.items() for n, v in names.items()}
    assert shown == held and held
    # Without contents too: the version is what the node holds, not the snapshot's.
    bare = client_config(stream.state, [fleet.snapshot], include_contents=False)
    assert {(c.type_url, c.name): c.version_info for c in bare.generic_xds_configs} == held
