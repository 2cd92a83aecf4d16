"""grpc_services: validation, the resources built for gRPC's xDS client, who gets them, and the
`bootstrap --grpc` JSON. (The real grpcio client runs in test_grpc_proxyless.py.)"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.cli.main import main
from controlplane.errors import ConfigError
from controlplane.health.store import HealthStatus
from controlplane.observe.nodes import node_view
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Cause, Snapshot, build_snapshot
from controlplane.topology.model import GrpcRoute, WeightedCluster
from controlplane.topology.parse import parse_topology
from controlplane.xds.stream import StreamState

SOURCE = "topology.yaml"
EXAMPLE = """\
clusters:
  - name: greeter
    endpoints: [{address: 127.0.0.1, port: 50051}, {address: 127.0.0.1, port: 50052, zone: b}]
  - name: greeter-canary
    endpoints: [{address: 127.0.0.1, port: 50061}]
  - name: web
    endpoints: [{address: 127.0.0.1, port: 8081}]
listeners:
  - name: ingress
    port: 10000
    routes: [{cluster: web}]
grpc_services:
  - name: greeter
    cluster: greeter
  - name: shop
    routes:
      - {service: shop.Cart, method: Checkout, cluster: greeter, timeout: 2s}
      - service: shop.Cart
        weighted_clusters: [{cluster: greeter, weight: 90}, {cluster: greeter-canary, weight: 10}]
      - {cluster: greeter-canary}
"""


@pytest.fixture
def doc() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE)
    return document


def error_at(document: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology(document, source=SOURCE)
    assert (info.value.path, info.value.source) == (path, SOURCE), str(info.value)
    assert message in info.value.message, str(info.value)


def test_the_example_parses_into_services_and_routes(doc: dict[str, Any]) -> None:
    topology = parse_topology(doc, source=SOURCE)
    greeter, shop = topology.grpc_services
    assert greeter.name == "greeter"
    assert greeter.routes == (GrpcRoute(clusters=(WeightedCluster("greeter", 1),)),)
    checkout, cart, rest = shop.routes
    assert (checkout.path, checkout.timeout) == ("/shop.Cart/Checkout", 2.0)
    assert (cart.path, cart.prefix) == (None, "/shop.Cart/")
    assert cart.clusters == (WeightedCluster("greeter", 90), WeightedCluster("greeter-canary", 10))
    assert (rest.path, rest.prefix) == (None, "")


@pytest.mark.parametrize(
    ("edit", "path", "message"),
    [
        (lambda d: d["grpc_services"][0].update(cluster="nope"), "grpc_services[0].cluster", "no cluster named 'nope'"),
        (lambda d: d["grpc_services"][0].pop("cluster"), "grpc_services[0]", "give cluster"),
        (lambda d: d["grpc_services"][0].update(routes=[]), "grpc_services[0]", "not both"),
        (lambda d: d["grpc_services"][1].update(routes=[]), "grpc_services[1].routes", "at least one route"),
        (lambda d: d["grpc_services"][1].update(name="greeter"), "grpc_services[1].name", "duplicate gRPC service"),
        (lambda d: d["grpc_services"][0].update(name="ingress"), "grpc_services[0].name", "listeners[0]"),
        (lambda d: d["grpc_services"][0].update(name="a/b"), "grpc_services[0].name", "does not match"),
        (lambda d: d["grpc_services"][0].update(port=1), "grpc_services[0].port", "unknown field"),
        (
            lambda d: d["grpc_services"][1]["routes"][0].pop("service"),
            "grpc_services[1].routes[0].method",
            "needs service",
        ),
        (
            lambda d: d["grpc_services"][1]["routes"][0].update(service="shop/Cart"),
            "grpc_services[1].routes[0].service",
            "does not match",
        ),
        (
            lambda d: d["grpc_services"][1]["routes"][1]["weighted_clusters"][1].update(weight=0),
            "grpc_services[1].routes[1].weighted_clusters[1].weight",
            "must be 1..10000",
        ),
        (
            lambda d: d["grpc_services"][1]["routes"][1]["weighted_clusters"][1].update(cluster="greeter"),
            "grpc_services[1].routes[1].weighted_clusters[1].cluster",
            "listed twice",
        ),
        (
            lambda d: d["grpc_services"][1]["routes"][1].update(cluster="web"),
            "grpc_services[1].routes[1]",
            "not both",
        ),
        (
            lambda d: d["grpc_services"][1]["routes"].insert(0, {"cluster": "web"}),
            "grpc_services[1].routes[1]",
            "never used: routes[0]",
        ),
        (
            lambda d: d["grpc_services"][1]["routes"].append(
                {"service": "shop.Cart", "method": "Checkout", "cluster": "web"}
            ),
            "grpc_services[1].routes[3]",
            "never used: routes[0] matches the same method",
        ),
        (
            lambda d: d["clusters"][0].update(lb_policy="LEAST_REQUEST"),
            "grpc_services[0].cluster",
            "lb_policy LEAST_REQUEST, which gRPC's xDS client rejects",
        ),
        (
            lambda d: d["clusters"][1].update(lb_policy="MAGLEV"),
            "grpc_services[1].routes[1]",
            "lb_policy MAGLEV",
        ),
    ],
)
def test_bad_grpc_services_are_rejected_at_their_field(doc: dict[str, Any], edit: Any, path: str, message: str) -> None:
    edit(doc)
    error_at(doc, path, message)


def test_ring_hash_is_fine_for_grpc(doc: dict[str, Any]) -> None:
    doc["clusters"][0]["lb_policy"] = "RING_HASH"
    assert parse_topology(doc).grpc_services[0].name == "greeter"


def snapshot_of(doc: dict[str, Any]) -> Snapshot:
    return build_snapshot(
        parse_topology(doc), lambda c, e: HealthStatus.HEALTHY, version="1.1", cause=Cause("start", "", 0.0)
    )


def test_api_listener_and_routes_are_what_grpc_accepts(doc: dict[str, Any]) -> None:
    snap = snapshot_of(doc)
    listener = rs.build_api_listener(parse_topology(doc).grpc_services[1])
    assert listener.name == "shop" and not listener.HasField("address") and not listener.filter_chains
    manager = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(manager)
    assert manager.rds.route_config_name == "shop" and manager.rds.config_source.HasField("ads")
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    assert snap.resources[rs.LISTENER]["shop"].serialized == listener.SerializeToString(deterministic=True)

    routes = rs.build_grpc_route_configuration(parse_topology(doc).grpc_services[1])
    [vhost] = routes.virtual_hosts
    assert list(vhost.domains) == ["shop"]
    checkout, cart, rest = vhost.routes
    assert checkout.match.path == "/shop.Cart/Checkout" and checkout.route.cluster == "greeter"
    assert checkout.route.max_stream_duration.max_stream_duration.seconds == 2
    assert cart.match.prefix == "/shop.Cart/"
    assert [(w.name, w.weight.value) for w in cart.route.weighted_clusters.clusters] == [
        ("greeter", 90),
        ("greeter-canary", 10),
    ]
    assert rest.match.prefix == "" and rest.route.cluster == "greeter-canary"
    # gRPC drops localities without a weight: every one carries the sum of its endpoints'.
    cla = rs.build_load_assignment(parse_topology(doc).clusters[0], lambda c, e: HealthStatus.HEALTHY)
    assert [loc.load_balancing_weight.value for loc in cla.endpoints] == [1, 1]


def request(type_url: str, names: list[str], *, agent: str, node: bool = True) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
    if node:
        req.node.CopyFrom(base_pb2.Node(id="n1", cluster="", user_agent_name=agent))
        if agent == "envoy":
            req.node.user_agent_build_version.version.major_number = 1
        else:
            req.node.user_agent_version = "1.85.3"
    return req


def test_envoy_wildcard_never_gets_api_listeners_but_grpc_gets_what_it_names(doc: dict[str, Any]) -> None:
    snap = snapshot_of(doc)
    envoy = StreamState(1)
    envoy.on_request(request(rs.LISTENER, [], agent="envoy"))
    assert envoy.identified and envoy.node_key == "n1" and envoy.user_agent == "envoy 1.0.0"
    [lds] = envoy.due(snap)
    assert lds.names == ("ingress",)

    grpc = StreamState(2)
    grpc.on_request(request(rs.LISTENER, ["shop"], agent="gRPC C-core linux Python"))
    assert grpc.node_key == "n1@shop" and grpc.user_agent == "gRPC C-core linux Python 1.85.3"
    [lds] = grpc.due(snap)
    assert lds.names == ("shop",)


def test_a_reconnecting_grpc_stream_is_identified_by_its_lds_request_not_its_first(doc: dict[str, Any]) -> None:
    grpc = StreamState(3)
    grpc.on_request(request(rs.CLUSTER, ["greeter"], agent="gRPC Go"))
    assert not grpc.identified  # the server neither serves nor shows it yet
    grpc.on_request(request(rs.LISTENER, ["greeter"], agent="gRPC Go", node=False))
    assert grpc.node_key == "n1@greeter"
    due = grpc.due(snapshot_of(doc))
    assert [(p.type_url, p.names) for p in due] == [(rs.CLUSTER, ("greeter",)), (rs.LISTENER, ("greeter",))]


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_bootstrap_grpc_prints_the_json_grpc_reads() -> None:
    code, text = run_cli(["bootstrap", "--grpc", "--node-id", "c1", "--xds", "127.0.0.1:18000", "--zone", "a"])
    assert code == 0
    assert json.loads(text) == {
        "xds_servers": [
            {"server_uri": "127.0.0.1:18000", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
        ],
        "node": {"id": "c1", "cluster": "", "locality": {"zone": "a"}},
    }
    argv = ["bootstrap", "--grpc", "--node-id", "c1", "--xds", "cp.example:18000", "--tls-ca", "ca.pem"]
    code, text = run_cli([*argv, "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert json.loads(text)["xds_servers"][0]["channel_creds"] == [
        {
            "type": "tls",
            "config": {"ca_certificate_file": "ca.pem", "certificate_file": "c.pem", "private_key_file": "k.pem"},
        }
    ]


def test_bootstrap_grpc_refuses_sni_and_envoy_still_needs_service(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bootstrap", "--grpc", "--node-id", "c1", "--xds", "127.0.0.1:18000", "--tls-ca", "ca.pem"]
    assert main([*argv, "--tls-sni", "cp.example"]) != 0
    assert "--tls-sni" in capsys.readouterr().err
    assert main(["bootstrap", "--node-id", "e1", "--xds", "127.0.0.1:18000"]) != 0
    assert "--service" in capsys.readouterr().err


def test_a_client_watching_one_cluster_is_not_behind_on_anothers_change(doc: dict[str, Any]) -> None:
    topology = parse_topology(doc)
    down: set[str] = set()

    def health(cluster: str, endpoint: str) -> HealthStatus:
        return HealthStatus.UNHEALTHY if cluster in down else HealthStatus.HEALTHY

    first = build_snapshot(topology, health, version="1.1", cause=Cause("start", "", 0.0))
    stream = StreamState(1)
    stream.on_request(request(rs.LISTENER, ["greeter"], agent="gRPC Python"))
    stream.on_request(request(rs.ENDPOINT, ["greeter"], agent="gRPC Python", node=False))

    def ack(snapshot: Snapshot) -> None:
        for pending in stream.due(snapshot):
            ack = request(pending.type_url, list(pending.names), agent="", node=False)
            ack.version_info, ack.response_nonce = pending.version, pending.nonce
            stream.on_request(ack)

    ack(first)
    assert node_view(stream, first)["up_to_date"] is True

    down.add("greeter-canary")
    second = build_snapshot(
        topology,
        health,
        version="1.2",
        cause=Cause("verdict", "", 0.0),
        previous=first,
        dirty_clusters=["greeter-canary"],
    )
    assert second.type_versions[rs.ENDPOINT] == "1.2" and stream.due(second) == []
    assert node_view(stream, second)["up_to_date"] is True

    down.add("greeter")
    third = build_snapshot(
        topology, health, version="1.3", cause=Cause("verdict", "", 0.0), previous=second, dirty_clusters=["greeter"]
    )
    assert node_view(stream, third)["up_to_date"] is False
    ack(third)
    assert node_view(stream, third)["up_to_date"] is True
