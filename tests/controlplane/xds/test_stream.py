"""StreamState: subscriptions, nonces, ACK/NACK and what is due, driven by hand-built requests.

Every response goes through `CheckedStream`, which asserts the protocol rules on each send (as
go-control-plane's fake stream does): nonces grow, types come in ADS order from the ADS set, one
response per type is in flight, versions and names match the snapshot, and the bytes decode.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane.errors import ProtocolError
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Cause, Snapshot, VersionClock, build_snapshot, encode_response
from controlplane.topology.parse import parse_topology_text
from controlplane.xds.stream import PendingResponse, RequestKind, RequestOutcome, StreamState

CDS, EDS, LDS, RDS = rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

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
  - name: public
    port: 10001
    nodes: [front]
    routes: [{cluster: api}]
"""
WITHOUT_API = TOPOLOGY[: TOPOLOGY.index("  - name: api")] + "listeners: []\n"


class Fleet:
    """Successive snapshots of one topology and its health, each built on the previous one."""

    def __init__(self, topology: str = TOPOLOGY) -> None:
        self.clock = VersionClock(epoch=1)
        self.statuses: dict[tuple[str, str], HealthStatus] = {}
        self.snapshot = self._build(topology, previous=None)

    def _build(self, text: str, *, previous: Snapshot | None) -> Snapshot:
        return build_snapshot(
            parse_topology_text(text), self.health, version=self.clock.next(), cause=Cause("topology", "", 0.0),
            previous=previous,
        )  # fmt: skip

    def health(self, cluster: str, endpoint: str) -> HealthStatus:
        return self.statuses.get((cluster, endpoint), HealthStatus.UNKNOWN)

    def flip(self, cluster: str, endpoint: str, status: HealthStatus = HealthStatus.UNHEALTHY) -> Snapshot:
        """A health change: a new snapshot where only `cluster`'s ClusterLoadAssignment changed."""
        self.statuses[(cluster, endpoint)] = status
        self.snapshot = build_snapshot(
            self.snapshot.topology, self.health, version=self.clock.next(), cause=Cause("verdict", "", 0.0),
            previous=self.snapshot, dirty_clusters=[cluster],
        )  # fmt: skip
        return self.snapshot

    def edit(self, text: str) -> Snapshot:
        self.snapshot = self._build(text, previous=self.snapshot)
        return self.snapshot


def request(
    type_url: str,
    names: Iterable[str] = (),
    *,
    version: str = "",
    nonce: str = "",
    node: base_pb2.Node | None = None,
    error: status_pb2.Status | None = None,
) -> discovery_pb2.DiscoveryRequest:
    message = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
    )
    if node is not None:
        message.node.CopyFrom(node)
    if error is not None:
        message.error_detail.CopyFrom(error)
    return message


class CheckedStream:
    """A StreamState driven the way Envoy drives it, with every response checked on the way out."""

    def __init__(self, node_cluster: str = "sidecar") -> None:
        self.state = StreamState(1, peer="ipv4:127.0.0.1:40000")
        self.node = base_pb2.Node(id=f"{node_cluster}-1", cluster=node_cluster)
        self.subscriptions: dict[str, list[str]] = {}
        self.in_flight: dict[str, str] = {}  # type URL -> nonce not yet ACKed or NACKed
        self.nonces: list[int] = []

    # ------------------------------------------------------------------ requests

    def send(
        self,
        type_url: str,
        names: Iterable[str] | None = None,
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> RequestOutcome:
        """One request; `names` default to the current subscription, `node` rides on the first only."""
        if names is not None:
            self.subscriptions[type_url] = list(names)
        outcome = self.state.on_request(
            request(
                type_url, self.subscriptions.get(type_url, []), version=version, nonce=nonce,
                node=self.node if self.state.node_id is None else None,
                error=None if error is None else status_pb2.Status(code=3, message=error),
            )
        )  # fmt: skip
        if outcome.kind in (RequestKind.ACK, RequestKind.NACK):
            # Answering the latest response (again, when only the names change) is fine; an older one is not.
            assert self.in_flight.pop(type_url, nonce) == nonce
        return outcome

    def ack(self, response: PendingResponse, names: Iterable[str] | None = None) -> RequestOutcome:
        outcome = self.send(response.type_url, names, version=response.version, nonce=response.nonce)
        assert outcome.kind is RequestKind.ACK
        return outcome

    def nack(self, response: PendingResponse, error: str = "rejected") -> RequestOutcome:
        # A NACK carries the version the node still runs, not the rejected one.
        still = self.state.types[response.type_url].acked_version or ""
        outcome = self.send(response.type_url, version=still, nonce=response.nonce, error=error)
        assert outcome.kind is RequestKind.NACK
        return outcome

    # ------------------------------------------------------------------ responses

    def due(self, snapshot: Snapshot) -> list[PendingResponse]:
        responses = self.state.due(snapshot)
        order = [_ads_position(r.type_url) for r in responses]
        assert order == sorted(set(order)), f"not in ADS order, or a type twice: {responses}"
        for response in responses:
            self._check(response, snapshot)
        return responses

    def due_one(self, snapshot: Snapshot) -> PendingResponse:
        (response,) = self.due(snapshot)
        return response

    def _check(self, response: PendingResponse, snapshot: Snapshot) -> None:
        type_url, names = response.type_url, response.names
        assert type_url not in self.in_flight, f"second {type_url} response before the first was ACKed"
        nonce = int(response.nonce)
        assert not self.nonces or nonce > self.nonces[-1], f"nonce {nonce} after {self.nonces[-1]}"
        self.nonces.append(nonce)
        self.in_flight[type_url] = response.nonce
        assert response.version == snapshot.type_versions[type_url]
        assert len(set(names)) == len(names) and set(names) <= set(snapshot.resources[type_url])
        for_node = set(snapshot.listener_names_for(self.state.node_cluster))
        if type_url == LDS:
            assert set(names) <= for_node, f"listeners of other nodes sent: {names}"
        if type_url in rs.FULL_STATE_TYPES and self.state.types[type_url].wildcard:
            everything = for_node if type_url == LDS else set(snapshot.resources[type_url])
            assert set(names) == everything, f"a full-state response must carry every resource: {names}"
        wire = encode_response(snapshot.response_body(type_url, names), response.nonce)
        decoded = discovery_pb2.DiscoveryResponse.FromString(wire)
        assert (decoded.type_url, decoded.version_info, decoded.nonce) == (type_url, response.version, response.nonce)
        assert [r.type_url for r in decoded.resources] == [type_url] * len(names)


def _ads_position(type_url: str) -> int:
    assert type_url in rs.ADS_ORDER, f"{type_url} is not an ADS type"
    return rs.ADS_ORDER.index(type_url)


def summary(responses: Iterable[PendingResponse]) -> list[tuple[str, tuple[str, ...]]]:
    """Responses as [("cds", names), ...], for readable assertions."""
    return [(rs.SHORT_NAMES[r.type_url], r.names) for r in responses]


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def stream() -> CheckedStream:
    return CheckedStream()


@pytest.fixture
def eds(stream: CheckedStream, fleet: Fleet) -> PendingResponse:
    """A stream subscribed to both ClusterLoadAssignments, the first response ACKed."""
    stream.send(EDS, ["web", "api"])
    response = stream.due_one(fleet.snapshot)
    assert response.names == ("web", "api")
    stream.ack(response)
    return response


# --------------------------------------------------------------------------- protocol errors


def test_first_request_must_carry_node() -> None:
    state = StreamState(1)
    with pytest.raises(ProtocolError, match="the first request on a stream must carry node"):
        state.on_request(request(CDS))
    assert state.node_id is None


def test_node_id_must_not_be_empty() -> None:
    with pytest.raises(ProtocolError, match=r"node\.id is empty"):
        StreamState(1).on_request(request(CDS, node=base_pb2.Node(cluster="front")))


def test_node_id_must_not_change_on_a_stream() -> None:
    state = StreamState(1)
    state.on_request(request(CDS, node=base_pb2.Node(id="a")))
    state.on_request(request(EDS, node=base_pb2.Node(id="a")))  # repeating it is fine
    with pytest.raises(ProtocolError, match=re.escape("node.id changed on one stream: 'a' -> 'b'")):
        state.on_request(request(LDS, node=base_pb2.Node(id="b")))


@pytest.mark.parametrize("first", [True, False], ids=["first-request", "later-request"])
def test_type_url_must_not_be_empty(stream: CheckedStream, first: bool) -> None:
    if not first:
        stream.send(CDS)
    with pytest.raises(ProtocolError, match="type_url is empty"):
        stream.send("")


def test_first_request_records_the_node() -> None:
    node = base_pb2.Node(
        id="front-1", cluster="front", locality=base_pb2.Locality(region="eu", zone="eu-1", sub_zone="rack-7"),
        user_agent_name="envoy",
    )  # fmt: skip
    node.user_agent_build_version.version.major_number = 1
    node.user_agent_build_version.version.minor_number = 31
    node.user_agent_build_version.version.patch = 2
    state = StreamState(7)
    state.on_request(request(CDS, node=node))
    state.on_request(request(LDS))  # later requests may leave node out
    assert (state.node_id, state.node_cluster, state.node_locality, state.user_agent) == (
        "front-1", "front", "eu/eu-1/rack-7", "envoy 1.31.2",
    )  # fmt: skip


def test_unsupported_type_is_ignored(stream: CheckedStream, fleet: Fleet) -> None:
    outcome = stream.send(SECRET, ["tls"], version="v1", nonce="")
    assert outcome == RequestOutcome(RequestKind.UNSUPPORTED, SECRET, "v1", "")
    assert SECRET not in stream.state.types
    assert stream.due(fleet.snapshot) == []


# --------------------------------------------------------------------------- subscriptions


def test_empty_names_on_the_first_cds_and_lds_request_mean_everything(stream: CheckedStream, fleet: Fleet) -> None:
    assert stream.send(CDS).kind is RequestKind.SUBSCRIBE
    assert stream.send(LDS).kind is RequestKind.SUBSCRIBE
    assert stream.state.types[CDS].wildcard and stream.state.types[LDS].wildcard
    assert summary(stream.due(fleet.snapshot)) == [("cds", ("web", "api")), ("lds", ("ingress",))]


def test_wildcard_stays_on_with_later_empty_requests(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    stream.ack(stream.due_one(fleet.snapshot))
    assert stream.state.types[CDS].wildcard
    snapshot = fleet.edit(TOPOLOGY.replace("listeners:", "  - name: extra\n    endpoints: []\nlisteners:"))
    assert stream.due_one(snapshot).names == ("web", "api", "extra")


@pytest.mark.parametrize("type_url", [EDS, RDS])
def test_empty_names_on_other_types_subscribe_nothing(stream: CheckedStream, fleet: Fleet, type_url: str) -> None:
    stream.send(type_url)
    assert not stream.state.types[type_url].wildcard
    assert stream.due(fleet.snapshot) == []


def test_explicit_wildcard_name(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["*"])
    assert stream.due_one(fleet.snapshot).names == ("web", "api")


def test_named_eds_subscription(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["api"])
    assert summary(stream.due(fleet.snapshot)) == [("eds", ("api",))]


def test_named_cds_subscription_changes_are_answered_in_full(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    wildcard = stream.due_one(fleet.snapshot)
    stream.ack(wildcard, ["api"])
    assert not stream.state.types[CDS].wildcard
    assert stream.due_one(fleet.snapshot).names == ("api",)


def test_responses_follow_ads_order(stream: CheckedStream, fleet: Fleet) -> None:
    for type_url, names in ((RDS, ["ingress"]), (LDS, []), (EDS, ["web"]), (CDS, [])):
        stream.send(type_url, names)
    assert summary(stream.due(fleet.snapshot)) == [
        ("cds", ("web", "api")), ("eds", ("web",)), ("lds", ("ingress",)), ("rds", ("ingress",)),
    ]  # fmt: skip


# --------------------------------------------------------------------------- nonces, ACK, NACK


def test_nonces_strictly_increase_across_types_and_pushes(stream: CheckedStream, fleet: Fleet) -> None:
    for type_url, names in ((CDS, []), (EDS, ["web", "api"]), (LDS, []), (RDS, ["ingress"])):
        stream.send(type_url, names)
    for snapshot in (fleet.snapshot, fleet.flip("web", "127.0.0.1:8081"), fleet.flip("api", "127.0.0.2:9000")):
        for response in stream.due(snapshot):
            stream.ack(response)
    assert stream.nonces == list(range(1, len(stream.nonces) + 1))
    assert len(stream.nonces) == 6


def test_one_response_per_type_in_flight(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    first = stream.due_one(fleet.snapshot)
    newer = fleet.edit(TOPOLOGY.replace("  - name: api\n", "  - name: api\n    connect_timeout: 5s\n"))
    assert stream.due(newer) == []  # still waiting for the ACK of the first
    stream.send(EDS, ["web"])
    assert summary(stream.due(newer)) == [("eds", ("web",))]  # other types are not held up
    stream.ack(first)
    assert stream.due_one(newer).version == newer.type_versions[CDS] != first.version


def test_ack_clears_awaiting_and_records_the_version(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    response = stream.due_one(fleet.snapshot)
    ts = stream.state.types[CDS]
    assert ts.awaiting_ack and ts.last_nonce == response.nonce and ts.acked_version is None
    outcome = stream.ack(response)
    assert (outcome.kind, outcome.version, outcome.nonce, outcome.error) == (
        RequestKind.ACK, response.version, response.nonce, None,
    )  # fmt: skip
    assert outcome.sent_at == ts.sent_at is not None
    assert not ts.awaiting_ack
    assert (ts.acked_version, ts.last_nack) == (response.version, None)
    assert ts.acked_at is not None and ts.acked_at >= ts.sent_at
    assert stream.due(fleet.snapshot) == []


def test_nack_is_recorded_and_the_rejected_version_not_resent(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    rejected = stream.due_one(fleet.snapshot)
    outcome = stream.nack(rejected, "cluster web: bad connect_timeout")
    assert (outcome.kind, outcome.error) == (RequestKind.NACK, "cluster web: bad connect_timeout")
    ts = stream.state.types[CDS]
    assert ts.last_nack is not None
    assert (ts.last_nack.version, ts.last_nack.error) == (rejected.version, "cluster web: bad connect_timeout")
    assert (ts.awaiting_ack, ts.acked_version) == (False, None)
    assert stream.due(fleet.snapshot) == []
    assert stream.due(fleet.snapshot) == []  # asked again (e.g. on another wake-up): still no loop

    fixed = fleet.edit(TOPOLOGY.replace("  - name: web\n", "  - name: web\n    connect_timeout: 2s\n"))
    assert stream.due_one(fixed).version == fixed.type_versions[CDS] != rejected.version


def test_eds_nack_then_only_changed_load_assignments(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["web", "api"])
    stream.nack(stream.due_one(fleet.snapshot))
    assert stream.due(fleet.snapshot) == []
    assert stream.due_one(fleet.flip("api", "127.0.0.2:9000")).names == ("api",)


def test_nack_without_a_message_reports_the_code(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    response = stream.due_one(fleet.snapshot)
    outcome = stream.state.on_request(request(CDS, nonce=response.nonce, error=status_pb2.Status(code=13)))
    assert (outcome.kind, outcome.error) == (RequestKind.NACK, "code 13")


def test_stale_nonce_is_ignored(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    old = stream.due_one(fleet.snapshot)
    stream.ack(old)
    stream.due_one(fleet.edit(TOPOLOGY.replace("- name: web\n", "- name: web\n    lb_policy: RANDOM\n")))
    before = copy.deepcopy(stream.state.types[CDS])

    for late in (
        request(CDS, ["api"], version=old.version, nonce=old.nonce),
        request(CDS, version=old.version, nonce=old.nonce, error=status_pb2.Status(message="late NACK")),
        request(CDS, nonce="999"),
    ):
        outcome = stream.state.on_request(late)
        assert (outcome.kind, outcome.nonce, outcome.error) == (RequestKind.STALE, late.response_nonce, None)
        assert stream.state.types[CDS] == before
    assert stream.due(fleet.snapshot) == []  # the newer response is still awaiting its ACK


def test_request_without_nonce_on_a_known_type_is_no_ack(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["web"])
    response = stream.due_one(fleet.snapshot)
    outcome = stream.send(EDS, ["web", "api"])
    assert outcome.kind is RequestKind.SUBSCRIBE
    assert stream.state.types[EDS].awaiting_ack
    stream.ack(response)
    assert stream.due_one(fleet.snapshot).names == ("api",)


def test_reconnect_with_a_current_version_still_gets_a_response(fleet: Fleet) -> None:
    stream = CheckedStream()
    outcome = stream.send(CDS, version=fleet.snapshot.type_versions[CDS])
    assert (outcome.kind, outcome.version) == (RequestKind.SUBSCRIBE, fleet.snapshot.type_versions[CDS])
    assert stream.due_one(fleet.snapshot).names == ("web", "api")


# --------------------------------------------------------------------------- what EDS carries


def test_eds_sends_only_changed_load_assignments(stream: CheckedStream, fleet: Fleet, eds: PendingResponse) -> None:
    snapshot = fleet.flip("api", "127.0.0.2:9000")
    response = stream.due_one(snapshot)
    assert (response.names, response.version) == (("api",), snapshot.version)
    stream.ack(response)
    assert stream.due(fleet.flip("api", "127.0.0.2:9000")) == []  # same status again: nothing changed


def test_names_not_in_the_snapshot_yet_are_sent_when_they_appear() -> None:
    fleet = Fleet(WITHOUT_API)
    stream = CheckedStream()
    stream.send(EDS, ["web", "api"])
    stream.ack(stream.due_one(fleet.snapshot))
    assert stream.due(fleet.snapshot) == []
    assert summary(stream.due(fleet.edit(TOPOLOGY))) == [("eds", ("api",))]


def test_unsubscribed_names_are_no_longer_sent(stream: CheckedStream, fleet: Fleet, eds: PendingResponse) -> None:
    stream.send(EDS, ["web"], version=eds.version, nonce=eds.nonce)
    assert stream.due(fleet.flip("api", "127.0.0.2:9000")) == []
    assert stream.due_one(fleet.flip("web", "127.0.0.1:8081")).names == ("web",)


def test_newly_subscribed_names_are_sent_even_if_unchanged(
    stream: CheckedStream, fleet: Fleet, eds: PendingResponse
) -> None:
    stream.send(EDS, ["web"], version=eds.version, nonce=eds.nonce)
    assert stream.due(fleet.snapshot) == []
    stream.send(EDS, ["web", "api"], version=eds.version, nonce=eds.nonce)
    again = stream.due_one(fleet.snapshot)
    assert (again.names, again.version) == (("api",), eds.version)


def test_cds_update_makes_the_next_eds_request_get_everything(stream: CheckedStream, fleet: Fleet) -> None:
    # Envoy re-creates changed clusters after CDS and asks for EDS again with the ACKed nonce and the
    # same names; the new clusters stay warming until they get an answer.
    stream.send(CDS)
    stream.ack(stream.due_one(fleet.snapshot))
    stream.send(EDS, ["web", "api"])
    eds = stream.due_one(fleet.snapshot)
    stream.ack(eds)
    assert stream.due(fleet.snapshot) == []

    snapshot = fleet.edit(TOPOLOGY.replace("  - name: api\n", "  - name: api\n    lb_policy: MAGLEV\n"))
    assert snapshot.type_versions[EDS] == eds.version  # the endpoints did not change
    stream.ack(stream.due_one(snapshot))  # CDS only
    assert stream.due(snapshot) == []

    stream.send(EDS, ["web", "api"], version=eds.version, nonce=eds.nonce)
    resent = stream.due_one(snapshot)
    assert (resent.type_url, resent.names, resent.version) == (EDS, ("web", "api"), eds.version)
    stream.ack(resent)
    assert stream.due(snapshot) == []


def test_eds_nack_after_a_cds_update_is_not_answered_with_the_rejected_version(
    stream: CheckedStream, fleet: Fleet
) -> None:
    stream.send(CDS)
    stream.ack(stream.due_one(fleet.snapshot))
    stream.send(EDS, ["web", "api"])
    stream.ack(stream.due_one(fleet.snapshot))
    both = TOPOLOGY.replace(
        "  - name: web\n    endpoints:\n",
        "  - name: web\n    connect_timeout: 3s\n    endpoints:\n      - {address: 127.0.0.1, port: 8083}\n",
    )
    snapshot = fleet.edit(both)
    cds, eds = stream.due(snapshot)
    assert (cds.names, eds.names) == (("web", "api"), ("web",))
    stream.ack(cds)
    stream.nack(eds)
    assert stream.due(snapshot) == []

    fixed = fleet.flip("web", "127.0.0.1:8083", HealthStatus.HEALTHY)
    assert stream.due_one(fixed).names == ("web",)


def test_eds_re_ack_without_a_cds_update_gets_nothing(
    stream: CheckedStream, fleet: Fleet, eds: PendingResponse
) -> None:
    stream.send(EDS, ["web", "api"], version=eds.version, nonce=eds.nonce)
    assert stream.due(fleet.snapshot) == []


# --------------------------------------------------------------------------- what LDS carries


@pytest.mark.parametrize(("node_cluster", "listeners"), [("front", ("ingress", "public")), ("sidecar", ("ingress",))])
def test_listeners_are_filtered_by_node_cluster(fleet: Fleet, node_cluster: str, listeners: tuple[str, ...]) -> None:
    stream = CheckedStream(node_cluster)
    stream.send(LDS)
    assert stream.due_one(fleet.snapshot).names == listeners


def test_listener_of_another_node_is_not_sent_even_by_name(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(LDS, ["public"])
    assert stream.due_one(fleet.snapshot).names == ()


def test_every_new_lds_version_reaches_every_node(stream: CheckedStream, fleet: Fleet) -> None:
    # So that each node's ACKed version says it has seen the latest, even when its own set is the same.
    stream.send(LDS)
    stream.ack(stream.due_one(fleet.snapshot))
    snapshot = fleet.edit(TOPOLOGY.replace("port: 10001", "port: 10002"))
    response = stream.due_one(snapshot)
    assert (response.names, response.version) == (("ingress",), snapshot.version)


# --------------------------------------------------------------------------- every type, one lifecycle

CHANGES = {
    CDS: lambda fleet: fleet.edit(TOPOLOGY.replace("- name: web\n", "- name: web\n    connect_timeout: 3s\n")),
    EDS: lambda fleet: fleet.flip("web", "127.0.0.1:8082"),
    LDS: lambda fleet: fleet.edit(TOPOLOGY.replace("port: 10000", "port: 10080")),
    RDS: lambda fleet: fleet.edit(TOPOLOGY.replace("prefix: /,", "prefix: /app,")),
}
SUBSCRIPTIONS = {CDS: [], EDS: ["web", "api"], LDS: [], RDS: ["ingress", "public"]}
CHANGED = {CDS: ("web", "api"), EDS: ("web",), LDS: ("ingress",), RDS: ("ingress",)}


@pytest.mark.parametrize("type_url", rs.ADS_ORDER, ids=lambda t: rs.SHORT_NAMES[t])
def test_lifecycle_for_every_type(stream: CheckedStream, fleet: Fleet, type_url: str) -> None:
    assert stream.send(type_url, SUBSCRIPTIONS[type_url]).kind is RequestKind.SUBSCRIBE
    first = stream.due_one(fleet.snapshot)
    assert first.type_url == type_url
    stream.ack(first)
    assert stream.due(fleet.snapshot) == []

    snapshot = CHANGES[type_url](fleet)
    second = stream.due_one(snapshot)
    assert (second.names, second.version) == (CHANGED[type_url], snapshot.version)
    assert int(second.nonce) > int(first.nonce)
    stream.ack(second)
    assert stream.state.types[type_url].acked_version == snapshot.version
    assert stream.due(snapshot) == []


# --------------------------------------------------------------------------- when to look again


def test_a_plain_ack_needs_no_second_look(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["web"])
    assert stream.state.needs_due(fleet.snapshot)  # a new subscription
    response = stream.due_one(fleet.snapshot)
    stream.ack(response)
    assert not stream.state.needs_due(fleet.snapshot)
    assert stream.due(fleet.snapshot) == []  # and indeed nothing is due


def test_a_new_snapshot_needs_a_look(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["web"])
    stream.ack(stream.due_one(fleet.snapshot))
    newer = fleet.flip("web", "127.0.0.1:8081")
    assert stream.state.needs_due(newer)
    assert summary(stream.due(newer)) == [("eds", ("web",))]


def test_an_ack_of_a_held_back_type_needs_a_look(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["web"])
    first = stream.due_one(fleet.snapshot)
    newer = fleet.flip("web", "127.0.0.1:8081")
    assert stream.due(newer) == []  # held back: the first is not ACKed yet
    stream.ack(first)
    assert stream.state.needs_due(newer)
    assert stream.due_one(newer).version == newer.type_versions[EDS]


def test_an_ack_of_a_response_that_carried_the_latest_needs_no_look(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(CDS)
    cds = stream.due_one(fleet.snapshot)
    newer = fleet.flip("web", "127.0.0.1:8081")  # EDS changes, CDS does not
    assert stream.due(newer) == []  # CDS is in flight, and it carries newer's clusters already
    stream.ack(cds)
    assert not stream.state.needs_due(newer)
    assert stream.due(newer) == []


def test_a_subscription_changed_while_its_response_is_in_flight_is_answered_after_the_ack(
    stream: CheckedStream, fleet: Fleet
) -> None:
    # A gRPC client asks CDS by name; a second request before it got any response carries no
    # nonce, so it is not stale: its names are the subscription now, and the ACK of the first
    # response (with those same names) must bring them.
    stream.send(CDS, ["web"])
    first = stream.due_one(fleet.snapshot)
    assert stream.send(CDS, ["web", "api"]).kind is RequestKind.SUBSCRIBE
    assert stream.due(fleet.snapshot) == []  # one response in flight per type
    stream.ack(first)
    assert stream.state.needs_due(fleet.snapshot)
    assert summary(stream.due(fleet.snapshot)) == [("cds", ("web", "api"))]


def test_a_nack_of_a_type_not_held_back_needs_no_look(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["web"])
    stream.nack(stream.due_one(fleet.snapshot))
    assert not stream.state.needs_due(fleet.snapshot)
    assert stream.due(fleet.snapshot) == []


def test_a_subscription_change_or_the_eds_resend_after_cds_needs_a_look(stream: CheckedStream, fleet: Fleet) -> None:
    stream.send(EDS, ["web"])
    eds_response = stream.due_one(fleet.snapshot)
    stream.ack(eds_response, names=["web", "api"])
    assert stream.state.needs_due(fleet.snapshot)
    assert summary(stream.due(fleet.snapshot)) == [("eds", ("api",))]

    stream.ack(_last(stream, EDS))
    stream.send(CDS)
    stream.ack(stream.due_one(fleet.snapshot))
    # Envoy re-requests EDS after CDS with the ACKed nonce and the same names.
    ts = stream.state.types[EDS]
    stream.send(EDS, version=ts.acked_version or "", nonce=ts.last_nonce or "")
    assert stream.state.needs_due(fleet.snapshot)
    assert summary(stream.due(fleet.snapshot)) == [("eds", ("web", "api"))]


def _last(stream: CheckedStream, type_url: str) -> PendingResponse:
    ts = stream.state.types[type_url]
    return PendingResponse(type_url, ts.sent_version or "", tuple(ts.sent), ts.last_nonce or "")
