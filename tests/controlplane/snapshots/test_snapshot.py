"""Snapshots: versions, the four resource tables, reuse across rebuilds, and the wire encoding."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message

from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import (
    Cause,
    EndpointView,
    Snapshot,
    VersionClock,
    build_snapshot,
    changed_resources,
    encode_response,
    version_key,
)
from controlplane.topology.model import Cluster, Topology
from controlplane.topology.parse import parse_topology_text

HEALTHY, UNHEALTHY, UNKNOWN = HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.UNKNOWN
EPOCH = 1_700_000_000_000

TOPOLOGY = """\
clusters:
  - name: web
    endpoints:
      - {address: 127.0.0.1, port: 8081, zone: a}
      - {address: 127.0.0.1, port: 8082, zone: b, weight: 2}
      - {address: 127.0.0.1, port: 8083, zone: b, weight: 3, hostname: web-3}
  - name: api
    healthy_panic_threshold: 25
    update_merge_window: 2s
    endpoints:
      - {address: 127.0.0.2, port: 9000, region: eu, zone: eu-1, sub_zone: rack-7}
listeners:
  - name: ingress
    port: 10000
    routes: [{prefix: /api, cluster: api}, {prefix: /, cluster: web}]
  - name: public
    port: 10001
    nodes: [front]
    routes: [{cluster: api}]
"""


class Fleet:
    """A topology and endpoint health, snapshotted the way the control plane does: one clock,
    each snapshot built on the previous one."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.clock = VersionClock(epoch=EPOCH)
        self.statuses: dict[tuple[str, str], HealthStatus] = {}
        self.last: Snapshot | None = None

    def health(self, cluster: str, endpoint: str) -> HealthStatus:
        return self.statuses.get((cluster, endpoint), UNKNOWN)

    def build(self, *, topology: Topology | None = None, dirty: Iterable[str] | None = None) -> Snapshot:
        self.topology = topology or self.topology
        cause = Cause("topology" if topology else "verdict", "test", 0.0)
        self.last = build_snapshot(
            self.topology, self.health, version=self.clock.next(), cause=cause, previous=self.last, dirty_clusters=dirty
        )
        return self.last

    def edit(self, document: str) -> Snapshot:
        return self.build(topology=parse_topology_text(document))


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(parse_topology_text(TOPOLOGY))


@pytest.fixture
def first(fleet: Fleet) -> Snapshot:
    fleet.statuses[("web", "127.0.0.1:8081")] = HEALTHY
    fleet.statuses[("web", "127.0.0.1:8082")] = UNHEALTHY
    return fleet.build()


def message(snapshot: Snapshot, type_url: str, name: str) -> Message:
    """The resource built directly from the topology, without any snapshot machinery."""
    topology = snapshot.topology
    cluster = topology.cluster(name)
    listener = next((lst for lst in topology.listeners if lst.name == name), None)
    health = {(v.cluster, f"{v.address}:{v.port}"): v.status for v in snapshot.endpoints}
    if type_url == rs.CLUSTER and cluster:
        return rs.build_cluster(cluster)
    if type_url == rs.ENDPOINT and cluster:
        return rs.build_load_assignment(cluster, lambda c, e: health[(c, e)])
    if type_url == rs.LISTENER and listener:
        return rs.build_listener(listener)
    if type_url == rs.ROUTE and listener:
        return rs.build_route_configuration(listener)
    raise AssertionError(f"no {type_url} named {name!r}")


def unpacked(snapshot: Snapshot, type_url: str, name: str) -> Message:
    parsed = type(message(snapshot, type_url, name))()
    parsed.ParseFromString(snapshot.resources[type_url][name].serialized)
    return parsed


def same_objects(old: Snapshot, new: Snapshot, type_url: str) -> dict[str, bool]:
    """Per resource name of `new`: whether it is the very Resource object `old` had."""
    return {n: old.resources[type_url].get(n) is r for n, r in new.resources[type_url].items()}


# --------------------------------------------------------------------------- versions


def test_version_clock_counts_within_an_epoch() -> None:
    clock = VersionClock(epoch=42)
    assert [clock.next(), clock.next(), clock.next()] == ["42.1", "42.2", "42.3"]
    assert clock.seq == 3


def test_version_clock_epoch_defaults_to_now_in_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controlplane.snapshots.snapshot.time.time", lambda: 1234.5678)
    assert VersionClock().epoch == 1234567


def test_a_restarted_clock_sorts_after_its_predecessor() -> None:
    before, after = VersionClock(epoch=1000), VersionClock(epoch=2000)
    old = [before.next() for _ in range(12)]
    new = after.next()
    assert version_key(new) > max(version_key(v) for v in old)
    assert sorted([*old, new], key=version_key)[-1] == new
    # Sorting as strings would get this wrong: "1000.12" < "1000.9".
    assert version_key(old[11]) > version_key(old[8])


@pytest.mark.parametrize("foreign", ["", "v1", "1.2.3", "abc.1", "7"])
def test_foreign_versions_sort_first(foreign: str) -> None:
    assert version_key(foreign) == (-1, -1)
    assert version_key(foreign) < version_key("0.0")


# --------------------------------------------------------------------------- building


def test_snapshot_has_all_four_tables(first: Snapshot) -> None:
    assert first.version == f"{EPOCH}.1"
    assert {t: list(table) for t, table in first.resources.items()} == {
        rs.CLUSTER: ["web", "api"],
        rs.ENDPOINT: ["web", "api"],
        rs.LISTENER: ["ingress", "public"],
        rs.ROUTE: ["ingress", "public"],
    }
    assert dict(first.type_versions) == dict.fromkeys(rs.ADS_ORDER, first.version)
    assert first.consistent() == []


@pytest.mark.parametrize("type_url", rs.ADS_ORDER)
def test_resources_serialize_the_built_messages(first: Snapshot, type_url: str) -> None:
    for name, resource in first.resources[type_url].items():
        assert (resource.name, resource.type_url, resource.version) == (name, type_url, first.version)
        assert unpacked(first, type_url, name) == message(first, type_url, name)


def test_snapshot_records_endpoint_views(first: Snapshot) -> None:
    assert first.endpoints == (
        EndpointView("web", "127.0.0.1", 8081, HEALTHY, "a", 1),
        EndpointView("web", "127.0.0.1", 8082, UNHEALTHY, "b", 2),
        EndpointView("web", "127.0.0.1", 8083, UNKNOWN, "b", 3),
        EndpointView("api", "127.0.0.2", 9000, UNKNOWN, "eu-1", 1),
    )


def test_listener_names_for_a_node(first: Snapshot) -> None:
    assert first.listener_names_for("front") == ("ingress", "public")
    assert first.listener_names_for("sidecar") == ("ingress",)


def test_load_assignments_carry_health_and_weights(first: Snapshot) -> None:
    cla = unpacked(first, rs.ENDPOINT, "web")
    seen = {}
    for locality in cla.endpoints:
        assert locality.HasField("load_balancing_weight"), locality.locality
        assert locality.load_balancing_weight.value == sum(e.load_balancing_weight.value for e in locality.lb_endpoints)
        for lb in locality.lb_endpoints:
            assert lb.HasField("load_balancing_weight")
            address = lb.endpoint.address.socket_address
            seen[address.port_value] = (locality.locality.zone, lb.health_status, lb.load_balancing_weight.value)
    assert seen == {8081: ("a", HEALTHY.value, 1), 8082: ("b", UNHEALTHY.value, 2), 8083: ("b", UNKNOWN.value, 3)}
    api = unpacked(first, rs.ENDPOINT, "api").endpoints[0]
    assert (api.locality.region, api.locality.zone, api.locality.sub_zone) == ("eu", "eu-1", "rack-7")
    assert api.load_balancing_weight.value == 1


@pytest.mark.parametrize(("name", "panic", "merge_window_ms"), [("web", 0.0, 0), ("api", 25.0, 2000)])
def test_clusters_set_panic_threshold_and_merge_window_explicitly(
    first: Snapshot, name: str, panic: float, merge_window_ms: int
) -> None:
    cluster = unpacked(first, rs.CLUSTER, name)
    common = cluster.common_lb_config
    assert cluster.HasField("common_lb_config")
    # Unset, Envoy would use 50% and 1 s; present-but-zero is how we say 0.
    assert common.HasField("healthy_panic_threshold")
    assert common.healthy_panic_threshold.value == panic
    assert common.HasField("update_merge_window")
    assert common.update_merge_window.ToMilliseconds() == merge_window_ms


# --------------------------------------------------------------------------- rebuilding


def test_rebuild_without_changes_reuses_every_resource(fleet: Fleet, first: Snapshot) -> None:
    second = fleet.build()
    assert second.version == f"{EPOCH}.2"
    for type_url in rs.ADS_ORDER:
        assert all(same_objects(first, second, type_url).values()), type_url
    assert second.type_versions == first.type_versions
    assert changed_resources(first, second) == {}


@pytest.mark.parametrize("dirty", [["web"], None], ids=["dirty-clusters", "full-rebuild"])
def test_health_change_rebuilds_one_load_assignment(fleet: Fleet, first: Snapshot, dirty: list[str] | None) -> None:
    fleet.statuses[("web", "127.0.0.1:8083")] = HEALTHY
    second = fleet.build(dirty=dirty)

    assert same_objects(first, second, rs.ENDPOINT) == {"web": False, "api": True}
    assert second.resources[rs.ENDPOINT]["web"].version == second.version
    assert second.resources[rs.ENDPOINT]["api"].version == first.version
    for type_url in (rs.CLUSTER, rs.LISTENER, rs.ROUTE):
        assert all(same_objects(first, second, type_url).values()), type_url
    assert dict(second.type_versions) == {
        rs.CLUSTER: first.version, rs.ENDPOINT: second.version, rs.LISTENER: first.version, rs.ROUTE: first.version,
    }  # fmt: skip
    assert changed_resources(first, second) == {rs.ENDPOINT: ["web"]}
    assert unpacked(second, rs.ENDPOINT, "web") == message(second, rs.ENDPOINT, "web")


def test_dirty_clusters_limit_the_rebuild(fleet: Fleet, first: Snapshot) -> None:
    fleet.statuses[("web", "127.0.0.1:8083")] = HEALTHY
    fleet.statuses[("api", "127.0.0.2:9000")] = HEALTHY  # changed, but not declared dirty
    second = fleet.build(dirty=["web"])
    assert same_objects(first, second, rs.ENDPOINT) == {"web": False, "api": True}


def test_dirty_clusters_are_ignored_for_a_new_topology(fleet: Fleet, first: Snapshot) -> None:
    fleet.statuses[("api", "127.0.0.2:9000")] = HEALTHY
    second = fleet.build(topology=parse_topology_text(TOPOLOGY), dirty=["web"])
    assert same_objects(first, second, rs.ENDPOINT) == {"web": True, "api": False}


def test_dirty_cluster_without_a_real_change_keeps_the_eds_version(fleet: Fleet, first: Snapshot) -> None:
    second = fleet.build(dirty=["web", "api"])
    assert all(same_objects(first, second, rs.ENDPOINT).values())
    assert second.type_versions == first.type_versions


def test_listener_change_bumps_only_lds_and_rds(fleet: Fleet, first: Snapshot) -> None:
    second = fleet.edit(TOPOLOGY.replace("port: 10000", "port: 10080").replace("prefix: /api", "prefix: /v2"))

    assert same_objects(first, second, rs.LISTENER) == {"ingress": False, "public": True}
    assert same_objects(first, second, rs.ROUTE) == {"ingress": False, "public": True}
    for type_url in (rs.CLUSTER, rs.ENDPOINT):
        assert all(same_objects(first, second, type_url).values()), type_url
    assert dict(second.type_versions) == {
        rs.CLUSTER: first.version, rs.ENDPOINT: first.version, rs.LISTENER: second.version, rs.ROUTE: second.version,
    }  # fmt: skip
    assert changed_resources(first, second) == {rs.LISTENER: ["ingress"], rs.ROUTE: ["ingress"]}


def test_listener_port_change_leaves_its_routes_alone(fleet: Fleet, first: Snapshot) -> None:
    second = fleet.edit(TOPOLOGY.replace("port: 10000", "port: 10080"))
    assert changed_resources(first, second) == {rs.LISTENER: ["ingress"]}
    assert second.type_versions[rs.ROUTE] == first.type_versions[rs.ROUTE]


def test_cluster_change_bumps_only_cds(fleet: Fleet, first: Snapshot) -> None:
    second = fleet.edit(TOPOLOGY.replace("healthy_panic_threshold: 25", "healthy_panic_threshold: 10"))
    assert changed_resources(first, second) == {rs.CLUSTER: ["api"]}
    assert [t for t in rs.ADS_ORDER if second.type_versions[t] == second.version] == [rs.CLUSTER]


def test_removing_a_listener_bumps_lds_and_rds(fleet: Fleet, first: Snapshot) -> None:
    second = fleet.edit(TOPOLOGY[: TOPOLOGY.index("  - name: public")])
    assert list(second.resources[rs.LISTENER]) == ["ingress"]
    assert second.resources[rs.LISTENER]["ingress"] is first.resources[rs.LISTENER]["ingress"]
    assert (second.type_versions[rs.LISTENER], second.type_versions[rs.ROUTE]) == (second.version, second.version)
    assert changed_resources(first, second) == {}  # it lists what is new or changed, not what went away


def test_adding_a_cluster_lists_it_as_changed(fleet: Fleet, first: Snapshot) -> None:
    added = TOPOLOGY.replace("listeners:", "  - name: extra\n    endpoints: []\nlisteners:")
    second = fleet.edit(added)
    assert changed_resources(first, second) == {rs.CLUSTER: ["extra"], rs.ENDPOINT: ["extra"]}


class Builds:
    """Counts the Cluster and ClusterLoadAssignment messages a rebuild really builds, by name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clusters: list[str] = []
        self.load_assignments: list[str] = []
        build_cluster, build_load_assignment = rs.build_cluster, rs.build_load_assignment

        def cluster(c: Cluster) -> Message:
            self.clusters.append(c.name)
            return build_cluster(c)

        def load_assignment(c: Cluster, health: rs.HealthLookup) -> Message:
            self.load_assignments.append(c.name)
            return build_load_assignment(c, health)

        monkeypatch.setattr(rs, "build_cluster", cluster)
        monkeypatch.setattr(rs, "build_load_assignment", load_assignment)


def test_a_topology_edit_builds_only_the_clusters_it_touches(
    fleet: Fleet, first: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = Builds(monkeypatch)
    edited = TOPOLOGY.replace("healthy_panic_threshold: 25", "healthy_panic_threshold: 10")
    second = fleet.edit(edited.replace("listeners:", "  - name: extra\n    endpoints: []\nlisteners:"))
    assert (builds.clusters, builds.load_assignments) == (["api", "extra"], ["api", "extra"])
    assert list(second.resources[rs.CLUSTER]) == ["web", "api", "extra"]  # the topology's order
    assert list(second.resources[rs.ENDPOINT]) == ["web", "api", "extra"]
    assert second.resources[rs.CLUSTER]["web"] is first.resources[rs.CLUSTER]["web"]
    assert second.resources[rs.ENDPOINT]["web"] is first.resources[rs.ENDPOINT]["web"]
    # api's load assignment was built again from its new model, and its bytes did not change.
    assert second.resources[rs.ENDPOINT]["api"] is first.resources[rs.ENDPOINT]["api"]
    assert changed_resources(first, second) == {rs.CLUSTER: ["api", "extra"], rs.ENDPOINT: ["extra"]}
    for type_url in (rs.CLUSTER, rs.ENDPOINT):
        for name in second.resources[type_url]:
            assert unpacked(second, type_url, name) == message(second, type_url, name), (type_url, name)


def test_a_topology_edit_rebuilds_the_load_assignment_whose_health_changed(
    fleet: Fleet, first: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = Builds(monkeypatch)
    fleet.statuses[("web", "127.0.0.1:8083")] = UNHEALTHY  # a verdict not yet published
    second = fleet.edit(TOPOLOGY.replace("port: 10000", "port: 10080"))
    assert (builds.clusters, builds.load_assignments) == ([], ["web"])
    assert changed_resources(first, second) == {rs.ENDPOINT: ["web"], rs.LISTENER: ["ingress"]}
    assert unpacked(second, rs.ENDPOINT, "web") == message(second, rs.ENDPOINT, "web")
    assert second.health_inputs["web"] == (HEALTHY, UNHEALTHY, UNHEALTHY)


def test_a_change_left_out_of_dirty_clusters_is_built_by_the_next_topology_edit(
    fleet: Fleet, first: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.statuses[("api", "127.0.0.2:9000")] = HEALTHY  # changed, but not declared dirty
    second = fleet.build(dirty=["web"])
    assert second.health_inputs["api"] == (UNKNOWN,)  # what its load assignment was built from
    builds = Builds(monkeypatch)
    third = fleet.edit(TOPOLOGY)
    assert builds.load_assignments == ["api"]
    assert changed_resources(second, third) == {rs.ENDPOINT: ["api"]}
    assert unpacked(third, rs.ENDPOINT, "api").endpoints[0].lb_endpoints[0].health_status == HEALTHY.value


def test_an_endpoint_added_rebuilds_its_cluster_and_load_assignment(
    fleet: Fleet, first: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = Builds(monkeypatch)
    endpoint = "      - {address: 127.0.0.2, port: 9000"
    second = fleet.edit(TOPOLOGY.replace(endpoint, "      - {address: 127.0.0.2, port: 9001}\n" + endpoint))
    assert (builds.clusters, builds.load_assignments) == (["api"], ["api"])
    assert second.resources[rs.CLUSTER]["api"] is first.resources[rs.CLUSTER]["api"]  # same bytes
    assert changed_resources(first, second) == {rs.ENDPOINT: ["api"]}
    assert unpacked(second, rs.ENDPOINT, "api") == message(second, rs.ENDPOINT, "api")


def test_clusters_with_raw_envoy_fields_are_always_built_again(
    fleet: Fleet, first: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    merge_window = "    update_merge_window: 2s\n"
    raw = TOPOLOGY.replace(merge_window, merge_window + "    envoy: {lbPolicy: MAGLEV}\n")
    second = fleet.edit(raw)
    builds = Builds(monkeypatch)
    third = fleet.edit(raw)
    assert (builds.clusters, builds.load_assignments) == (["api"], ["api"])
    assert third.resources[rs.CLUSTER]["api"] is second.resources[rs.CLUSTER]["api"]  # same bytes, same version
    assert unpacked(third, rs.CLUSTER, "api").lb_policy == unpacked(third, rs.CLUSTER, "api").MAGLEV


def test_changed_resources_from_nothing_is_everything(first: Snapshot) -> None:
    assert changed_resources(None, first) == {t: list(first.resources[t]) for t in rs.ADS_ORDER}


def test_consistent_reports_orphans(first: Snapshot) -> None:
    broken = replace(
        first,
        resources={**first.resources, rs.CLUSTER: {}, rs.LISTENER: {"public": first.resources[rs.LISTENER]["public"]}},
    )
    assert broken.consistent() == [
        "ClusterLoadAssignment 'web' has no Cluster",
        "ClusterLoadAssignment 'api' has no Cluster",
        "RouteConfiguration 'ingress' has no Listener",
    ]


# --------------------------------------------------------------------------- wire encoding


def expected_response(snapshot: Snapshot, type_url: str, names: tuple[str, ...], nonce: str) -> Message:
    response = discovery_pb2.DiscoveryResponse(
        version_info=snapshot.type_versions[type_url], type_url=type_url, nonce=nonce
    )
    for name in names:
        response.resources.add().Pack(message(snapshot, type_url, name))
    return response


@pytest.mark.parametrize("type_url", rs.ADS_ORDER)
@pytest.mark.parametrize("nonce", ["1", "n" * 300], ids=["short-nonce", "long-nonce"])
def test_encoded_response_is_a_discovery_response(first: Snapshot, type_url: str, nonce: str) -> None:
    names = tuple(first.resources[type_url])
    for chosen in (names, names[:1], names[::-1], ()):
        wire = encode_response(first.response_body(type_url, chosen), nonce)
        assert discovery_pb2.DiscoveryResponse.FromString(wire) == expected_response(first, type_url, chosen, nonce)


def test_encoded_response_after_a_rebuild_carries_the_type_version(fleet: Fleet, first: Snapshot) -> None:
    fleet.statuses[("api", "127.0.0.2:9000")] = UNHEALTHY
    second = fleet.build(dirty=["api"])
    decoded = discovery_pb2.DiscoveryResponse.FromString(
        encode_response(second.response_body(rs.CLUSTER, ("web",)), "9")
    )
    assert decoded.version_info == first.version  # CDS did not change
    decoded = discovery_pb2.DiscoveryResponse.FromString(
        encode_response(second.response_body(rs.ENDPOINT, ("api",)), "9")
    )
    assert decoded == expected_response(second, rs.ENDPOINT, ("api",), "9")
    assert decoded.version_info == second.version


def test_response_bodies_are_encoded_once(first: Snapshot) -> None:
    body = first.response_body(rs.ENDPOINT, ("web",))
    assert first.response_body(rs.ENDPOINT, ("web",)) is body
    assert first.response_body(rs.ENDPOINT, ("web", "api")) is not body
    assert first.response_body(rs.CLUSTER, ("web",)) is not body
    assert encode_response(body, "1") != encode_response(body, "2")
    assert first.response_body(rs.ENDPOINT, ("web",)) is body  # appending a nonce copies, never mutates


def test_unknown_resource_name_is_a_key_error(first: Snapshot) -> None:
    with pytest.raises(KeyError):
        first.response_body(rs.CLUSTER, ("nope",))


# --------------------------------------------------------------------------- issue 15: passive access logs

PASSIVE_TOPOLOGY = """
clusters:
  - name: web
    endpoints: [{address: 10.0.0.1, port: 80}]
    passive: {unhealthy: {http_failures: 3}}
  - name: api
    endpoints: [{address: 10.0.0.2, port: 80}]
listeners:
  - {name: front, port: 10000, routes: [{prefix: /api, cluster: api}, {prefix: /, cluster: web}]}
  - {name: internal, port: 10001, routes: [{prefix: /, cluster: api}]}
"""


def test_listeners_leading_to_a_passive_cluster_log_to_healthplane_over_the_xds_cluster() -> None:
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.access_loggers.grpc.v3 import als_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

    from controlplane.xds.bootstrap import make_bootstrap

    snapshot = build_snapshot(
        parse_topology_text(PASSIVE_TOPOLOGY), lambda c, e: HealthStatus.HEALTHY, version="1", cause=Cause("t", "", 0)
    )
    loggers: dict[str, list[als_pb2.HttpGrpcAccessLogConfig]] = {}
    for name in ("front", "internal"):
        listener = listener_pb2.Listener.FromString(snapshot.resources[rs.LISTENER][name].serialized)
        manager = hcm_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
        loggers[name] = []
        for log in manager.access_log:
            assert log.name == "envoy.access_loggers.http_grpc"
            config = als_pb2.HttpGrpcAccessLogConfig()
            log.typed_config.Unpack(config)
            loggers[name].append(config)
    assert loggers["internal"] == []
    [config] = loggers["front"]
    common = config.common_config
    bootstrap = make_bootstrap(node_id="n", service="s", xds_host="127.0.0.1", xds_port=1)
    assert common.grpc_service.envoy_grpc.cluster_name == bootstrap["static_resources"]["clusters"][0]["name"]
    assert common.buffer_flush_interval.ToMilliseconds() == rs.ACCESS_LOG_FLUSH_INTERVAL * 1000
    assert common.buffer_size_bytes.value == rs.ACCESS_LOG_BUFFER_BYTES
