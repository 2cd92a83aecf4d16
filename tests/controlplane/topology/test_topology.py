"""Topology validation: what parses, and that every error names the file and the field path."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.errors import ConfigError
from controlplane.health.store import HealthStatus
from controlplane.snapshots.snapshot import Cause, build_snapshot
from controlplane.topology.model import (
    ControlPlaneConfig,
    GrpcCheck,
    HealthCheck,
    HttpCheck,
    Route,
    SocketAddress,
    TcpCheck,
    Topology,
)
from controlplane.topology.parse import load_topology, parse_topology, parse_topology_text

SOURCE = "topology.yaml"

EXAMPLE = """\
controlplane:
  xds: {address: 127.0.0.1, port: 18000}
  admin: {address: 127.0.0.1, port: 19000}
clusters:
  - name: web
    endpoints:
      - {address: 127.0.0.1, port: 8081}
      - {address: 127.0.0.1, port: 8082, zone: b, weight: 2}
    health_check: {http: {path: /livez}, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}
listeners:
  - name: ingress
    address: 0.0.0.0
    port: 10000
    routes: [{prefix: /, cluster: web}]
"""


@pytest.fixture
def doc() -> dict[str, Any]:
    """A fresh copy of the example document, for each test to break in its own way."""
    document: dict[str, Any] = yaml.safe_load(EXAMPLE)
    return document


def parse(document: Any) -> Topology:
    return parse_topology(document, source=SOURCE)


def error_of(document: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(document)
    return info.value


def assert_error(document: Any, path: str, message: str) -> ConfigError:
    """The document is rejected at `path` with a message starting with `message`, naming the file."""
    error = error_of(document)
    assert (error.source, error.path) == (SOURCE, path), str(error)
    assert error.message.startswith(message), str(error)
    assert str(error).startswith(f"{SOURCE}: {path}: " if path else f"{SOURCE}: ")
    return error


def hc(document: dict[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = document["clusters"][0]["health_check"]
    return section


def endpoint(document: dict[str, Any], i: int = 0) -> dict[str, Any]:
    ep: dict[str, Any] = document["clusters"][0]["endpoints"][i]
    return ep


def listener(document: dict[str, Any], i: int = 0) -> dict[str, Any]:
    lst: dict[str, Any] = document["listeners"][i]
    return lst


# --------------------------------------------------------------------------- the example


def test_example_parses(doc: dict[str, Any]) -> None:
    topology = parse(doc)

    assert topology.source == SOURCE
    assert topology.controlplane == ControlPlaneConfig(
        xds=SocketAddress("127.0.0.1", 18000), admin=SocketAddress("127.0.0.1", 19000)
    )
    (web,) = topology.clusters
    assert topology.cluster("web") is web
    assert topology.cluster("api") is None
    assert web.health_check == HealthCheck(
        kind="http", http=HttpCheck(path="/livez"), interval=1.0, timeout=0.5,
        healthy_threshold=2, unhealthy_threshold=2,
    )  # fmt: skip
    assert [(e.key, e.zone, e.weight) for e in web.endpoints] == [
        ("127.0.0.1:8081", "", 1),
        ("127.0.0.1:8082", "b", 2),
    ]
    assert all(e.health_check == web.health_check for e in web.endpoints)
    assert web.endpoint("127.0.0.1:8082") is web.endpoints[1]
    assert (web.healthy_panic_threshold, web.update_merge_window, web.lb_policy) == (0.0, 0.0, "ROUND_ROBIN")
    (ingress,) = topology.listeners
    assert (ingress.name, ingress.address, ingress.port) == ("ingress", "0.0.0.0", 10000)
    assert ingress.routes == (Route(cluster="web", prefix="/"),)
    assert ingress.domains == ("*",)
    assert ingress.nodes is None
    assert ingress.for_node("anything")


def test_json_is_yaml() -> None:
    text = '{"clusters": [{"name": "web", "endpoints": [{"address": "::1", "port": 80}]}]}'
    topology = parse_topology_text(text, source="t.json")
    assert topology.clusters[0].endpoints[0].key == "::1:80"


@pytest.mark.parametrize("document", [None, {}])
def test_empty_document_is_an_empty_topology(document: Any) -> None:
    topology = parse(document)
    assert (topology.clusters, topology.listeners) == ((), ())
    assert topology.controlplane == ControlPlaneConfig()


def test_addresses_are_normalized(doc: dict[str, Any]) -> None:
    endpoint(doc)["address"] = "0:0:0:0:0:0:0:1"
    assert parse(doc).clusters[0].endpoints[0].address == "::1"


def test_listener_nodes_select_node_clusters(doc: dict[str, Any]) -> None:
    listener(doc)["nodes"] = ["front", "edge"]
    ingress = parse(doc).listeners[0]
    assert ingress.nodes == ("front", "edge")
    assert ingress.for_node("front")
    assert not ingress.for_node("sidecar")


# --------------------------------------------------------------------------- error messages


def test_error_names_the_file_and_the_field_path(doc: dict[str, Any]) -> None:
    doc["clusters"].append({"name": "api", "endpoints": [{"address": "127.0.0.1", "port": 70000}]})
    error = error_of(doc)
    assert str(error) == f"{SOURCE}: clusters[1].endpoints[0].port: must be 1..65535"


def test_error_without_source_starts_with_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology({"clusters": 3})
    assert str(info.value) == "clusters: must be a list, got int"


def test_root_must_be_a_mapping() -> None:
    assert_error(["clusters"], "", "must be a mapping, got a list")


def test_keys_must_be_strings() -> None:
    assert_error({1: "x"}, "", "keys must be strings, got 1")


UNKNOWN_FIELDS = [
    ((), "services", "services"),
    (("controlplane", "xds"), "host", "controlplane.xds.host"),
    (("clusters", 0), "endpoint", "clusters[0].endpoint"),
    (("clusters", 0, "endpoints", 1), "zonee", "clusters[0].endpoints[1].zonee"),
    (("clusters", 0, "health_check"), "rise", "clusters[0].health_check.rise"),
    (("clusters", 0, "health_check", "http"), "paht", "clusters[0].health_check.http.paht"),
    (("listeners", 0), "routs", "listeners[0].routs"),
    (("listeners", 0, "routes", 0), "clutser", "listeners[0].routes[0].clutser"),
]


@pytest.mark.parametrize(("parent", "key", "path"), [pytest.param(*case, id=case[2]) for case in UNKNOWN_FIELDS])
def test_unknown_fields_are_named(doc: dict[str, Any], parent: tuple[str | int, ...], key: str, path: str) -> None:
    section: Any = doc
    for step in parent:
        section = section[step]
    section[key] = 1
    assert_error(doc, path, "unknown field (expected one of: ")


def test_unknown_field_lists_the_allowed_ones(doc: dict[str, Any]) -> None:
    doc["service"] = {}
    assert_error(doc, "service", "unknown field (expected one of: clusters, controlplane, listeners)")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("port", "8081", "must be an integer, got a string"),
        ("port", True, "must be an integer, got a boolean"),
        ("port", 8081.0, "must be an integer, got float"),
        ("port", 0, "must be 1..65535"),
        ("port", 65536, "must be 1..65535"),
        ("port", None, "is required"),
        ("address", None, "is required"),
        ("address", 127, "must be a string, got int"),
        ("address", "localhost", "'localhost' is not an IP address"),
        ("weight", 0, "must be 1..128"),
        ("weight", 129, "must be 1..128"),
        ("zone", ["b"], "must be a string, got a list"),
        ("zone", {"b": 1}, "must be a string, got a mapping"),
        ("health_check", "http", "must be a mapping, got a string"),
    ],
)
def test_endpoint_field_errors(doc: dict[str, Any], field: str, value: Any, message: str) -> None:
    endpoint(doc, 1)[field] = value
    assert_error(doc, f"clusters[0].endpoints[1].{field}", message)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", None, "is required"),
        ("name", 5, "must be a string, got int"),
        ("name", "web cluster", "'web cluster' does not match"),
        ("name", "web\n", "'web\\n' does not match"),  # `$` would match before a trailing newline
        ("name", "", "'' does not match"),
        ("endpoints", {"address": "127.0.0.1"}, "must be a list, got a mapping"),
        ("connect_timeout", "soon", "not a duration: 'soon'"),
        ("connect_timeout", 0, "must be greater than 0"),
        ("connect_timeout", True, "must be a duration such as 1s or 500ms"),
        ("connect_timeout", math.nan, "must be a duration such as 1s or 500ms, got NaN"),
        ("connect_timeout", math.inf, "is absurdly long"),
        ("connect_timeout", "400d", "not a duration"),
        ("update_merge_window", -1, "must not be negative"),
        ("lb_policy", "FASTEST", "'FASTEST' is not one of ROUND_ROBIN"),
        ("healthy_panic_threshold", 101, "must be 0..100"),
        ("healthy_panic_threshold", "50%", "must be a number, got a string"),
        ("healthy_panic_threshold", math.nan, "must be 0..100"),
        ("envoy", ["connectTimeout"], "must be a mapping of Envoy fields"),
    ],
)
def test_cluster_field_errors(doc: dict[str, Any], field: str, value: Any, message: str) -> None:
    doc["clusters"][0][field] = value
    assert_error(doc, f"clusters[0].{field}", message)


def test_cluster_options(doc: dict[str, Any]) -> None:
    doc["clusters"][0].update(
        connect_timeout="250ms", lb_policy="least_request", healthy_panic_threshold=25, update_merge_window="1s"
    )
    web = parse(doc).clusters[0]
    assert (web.connect_timeout, web.lb_policy, web.healthy_panic_threshold, web.update_merge_window) == (
        0.25, "LEAST_REQUEST", 25.0, 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("interval", "soon", "not a duration: 'soon'"),
        ("interval", 0, "must be greater than 0"),
        ("interval", math.nan, "must be a duration such as 1s or 500ms, got NaN"),
        ("interval", "2y", "not a duration"),
        ("interval", 86400 * 366, "is absurdly long"),
        ("timeout", "2s", "must not exceed the interval (1s)"),
        ("healthy_threshold", 0, "must be 1..1000"),
        ("unhealthy_threshold", "3", "must be an integer, got a string"),
        ("port", 0, "must be 1..65535"),
        ("initial_status", "sick", "must be unknown, healthy or unhealthy"),
        ("interval_jitter", 150, "must be 0..100"),
    ],
)
def test_health_check_field_errors(doc: dict[str, Any], field: str, value: Any, message: str) -> None:
    hc(doc)[field] = value
    assert_error(doc, f"clusters[0].health_check.{field}", message)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("path", "livez", "must start with /"),
        ("method", "BREW", "'BREW' is not a supported HTTP method"),
        ("https", "yes", "must be true or false, got a string"),
        ("keepalive_requests", -1, "must be >= 0"),
        ("headers", ["X-A: 1"], "must be a mapping of header name to value"),
        ("expected_statuses", [], "must list at least one status or range"),
        ("expected_statuses", 200, "must be a list, got int"),
    ],
)
def test_http_check_field_errors(doc: dict[str, Any], field: str, value: Any, message: str) -> None:
    hc(doc)["http"][field] = value
    assert_error(doc, f"clusters[0].health_check.http.{field}", message)


@pytest.mark.parametrize("name", ["Bad Header", "X-Foo\n", "X:Y", ""])
def test_header_names_are_tokens(doc: dict[str, Any], name: str) -> None:
    hc(doc)["http"]["headers"] = {name: "1"}
    assert_error(doc, "clusters[0].health_check.http.headers", f"{name!r} is not a valid header name")


def test_header_values_are_strings(doc: dict[str, Any]) -> None:
    hc(doc)["http"]["headers"] = {"X-Probe": 1}
    assert_error(doc, "clusters[0].health_check.http.headers.X-Probe", "must be a string, got int")


def test_http_check_options(doc: dict[str, Any]) -> None:
    hc(doc)["http"] = {
        "path": "/healthz", "method": "head", "host": "web.internal", "headers": {"X-Probe": "hp"},
        "https": True, "sni": "web.internal", "verify_tls": False, "keepalive": False, "keepalive_requests": 10,
    }  # fmt: skip
    check = parse(doc).clusters[0].health_check
    assert check is not None
    assert check.http == HttpCheck(
        path="/healthz", method="HEAD", host="web.internal", headers=(("X-Probe", "hp"),),
        https=True, sni="web.internal", verify_tls=False, keepalive=False, keepalive_requests=10,
    )  # fmt: skip


def test_health_check_needs_exactly_one_kind(doc: dict[str, Any]) -> None:
    del hc(doc)["http"]
    assert_error(doc, "clusters[0].health_check", "needs one check kind: http, tcp or grpc")
    hc(doc).update(http={}, tcp={})
    assert_error(doc, "clusters[0].health_check", "give one check kind, not http and tcp")


@pytest.mark.parametrize(
    ("section", "check"),
    [
        ({"http": None}, HealthCheck(kind="http", http=HttpCheck())),
        ({"http": {}}, HealthCheck(kind="http", http=HttpCheck())),
        ({"tcp": None}, HealthCheck(kind="tcp", tcp=TcpCheck())),
        ({"grpc": {}}, HealthCheck(kind="grpc", grpc=GrpcCheck())),
        ({"grpc": {"service": "web.v1", "authority": "web"}},
         HealthCheck(kind="grpc", grpc=GrpcCheck(service="web.v1", authority="web"))),
    ],
)  # fmt: skip
def test_check_kinds_with_defaults(doc: dict[str, Any], section: dict[str, Any], check: HealthCheck) -> None:
    doc["clusters"][0]["health_check"] = section
    assert parse(doc).clusters[0].health_check == check


def test_grpc_check_over_mutual_tls(doc: dict[str, Any]) -> None:
    files = {"ca_file": "/etc/hp/ca.pem", "cert_file": "/etc/hp/prober.pem", "key_file": "/etc/hp/prober.key"}
    doc["clusters"][0]["health_check"] = {"grpc": {"tls": True, "sni": "api.internal", **files}}
    check = GrpcCheck(tls=True, sni="api.internal", **files)
    assert parse(doc).clusters[0].health_check == HealthCheck(kind="grpc", grpc=check)


@pytest.mark.parametrize(
    ("grpc", "path", "message"),
    [
        ({"ca_file": "/ca.pem"}, "grpc.ca_file", "needs tls: true"),
        ({"tls": False, "sni": "x"}, "grpc.sni", "needs tls: true"),
        ({"tls": True, "cert_file": "/c.pem"}, "grpc.key_file", "is required with cert_file"),
        ({"tls": True, "key_file": "/k.pem"}, "grpc.cert_file", "is required with key_file"),
        ({"tls": True, "verify_tls": False}, "grpc.verify_tls", "is not supported for gRPC checks"),
        ({"tls": "yes"}, "grpc.tls", "must be"),
    ],
)
def test_grpc_tls_errors(doc: dict[str, Any], grpc: dict[str, Any], path: str, message: str) -> None:
    doc["clusters"][0]["health_check"] = {"grpc": grpc}
    assert_error(doc, f"clusters[0].health_check.{path}", message)


# --------------------------------------------------------------------------- tcp payloads and statuses


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("PING\r\n", b"PING\r\n"),
        ({"text": "héllo"}, "héllo".encode()),
        ({"hex": "0a0BfF"}, b"\x0a\x0b\xff"),
        ({"hex": "de ad be ef"}, b"\xde\xad\xbe\xef"),
        ({"hex": ""}, b""),
        (None, None),
    ],
)
def test_tcp_payloads(doc: dict[str, Any], payload: Any, expected: bytes | None) -> None:
    doc["clusters"][0]["health_check"] = {"tcp": {"send": payload, "receive": {"hex": "2b4f4b"}}}
    check = parse(doc).clusters[0].health_check
    assert check is not None
    assert (check.kind, check.http, check.tcp) == ("tcp", None, TcpCheck(send=expected, receive=b"+OK"))


@pytest.mark.parametrize(
    ("payload", "path", "message"),
    [
        ({"hex": "zz"}, "send.hex", "is not valid hex"),
        ({"hex": "abc"}, "send.hex", "is not valid hex"),
        ({"hex": 12}, "send.hex", "must be a string, got int"),
        ({"raw": "x"}, "send.raw", "unknown field (expected one of: hex, text)"),
        ({}, "send.text", "is required"),
        (5, "send", "must be a mapping, got int"),
    ],
)
def test_tcp_payload_errors(doc: dict[str, Any], payload: Any, path: str, message: str) -> None:
    doc["clusters"][0]["health_check"] = {"tcp": {"send": payload}}
    assert_error(doc, f"clusters[0].health_check.tcp.{path}", message)


@pytest.mark.parametrize(
    ("statuses", "ranges"),
    [
        ([200], ((200, 200),)),
        ([[200, 299], 404], ((200, 299), (404, 404))),
        ([[100, 599]], ((100, 599),)),
        ([[204, 204]], ((204, 204),)),
    ],
)
def test_expected_statuses(doc: dict[str, Any], statuses: list[Any], ranges: tuple[tuple[int, int], ...]) -> None:
    hc(doc)["http"]["expected_statuses"] = statuses
    check = parse(doc).clusters[0].health_check
    assert check is not None and check.http is not None
    assert check.http.expected_statuses == ranges


def test_expected_statuses_default_to_2xx_and_3xx(doc: dict[str, Any]) -> None:
    check = parse(doc).clusters[0].health_check
    assert check is not None and check.http is not None
    assert check.http.expected_statuses == ((200, 399),)


@pytest.mark.parametrize(
    ("statuses", "path", "message"),
    [
        ([99], "[0]", "must be 100..599"),
        ([200, 600], "[1]", "must be 100..599"),
        ([[300, 200]], "[0]", "range [300, 200] is empty: first must be <= last"),
        ([[200]], "[0]", "must be a status code or a [first, last] range"),
        ([[200, 299, 399]], "[0]", "must be a status code or a [first, last] range"),
        ([True], "[0]", "must be a status code or a [first, last] range"),
        (["2xx"], "[0]", "must be a status code or a [first, last] range"),
        ([[200, "299"]], "[0][1]", "must be an integer, got a string"),
        ([[99, 200]], "[0][0]", "must be 100..599"),
    ],
)
def test_expected_status_errors(doc: dict[str, Any], statuses: list[Any], path: str, message: str) -> None:
    hc(doc)["http"]["expected_statuses"] = statuses
    assert_error(doc, f"clusters[0].health_check.http.expected_statuses{path}", message)


# --------------------------------------------------------------------------- per-endpoint health checks


def endpoint_check(doc: dict[str, Any], i: int) -> HealthCheck:
    check = parse(doc).clusters[0].endpoints[i].health_check
    assert check is not None
    return check


def test_endpoint_override_merges_over_the_cluster_check(doc: dict[str, Any]) -> None:
    endpoint(doc, 1)["health_check"] = {"interval": "2s", "port": 9901, "unhealthy_threshold": 5}
    topology = parse(doc)
    web = topology.clusters[0]
    assert web.health_check is not None
    assert web.endpoints[0].health_check == web.health_check
    assert web.endpoints[1].health_check == replace(web.health_check, interval=2.0, port=9901, unhealthy_threshold=5)


def test_endpoint_override_can_change_the_check_kind(doc: dict[str, Any]) -> None:
    endpoint(doc)["health_check"] = {"tcp": {"send": "PING"}}
    check = endpoint_check(doc, 0)
    assert (check.kind, check.http, check.tcp) == ("tcp", None, TcpCheck(send=b"PING"))
    assert (check.interval, check.timeout, check.healthy_threshold) == (1.0, 0.5, 2)


def test_endpoint_override_replaces_the_http_section_whole(doc: dict[str, Any]) -> None:
    endpoint(doc)["health_check"] = {"http": {"method": "HEAD"}}
    assert endpoint_check(doc, 0).http == HttpCheck(path="/", method="HEAD")


def test_endpoint_override_timeout_is_checked_against_the_inherited_interval(doc: dict[str, Any]) -> None:
    endpoint(doc)["health_check"] = {"timeout": "1500ms"}
    assert_error(doc, "clusters[0].endpoints[0].health_check.timeout", "must not exceed the interval (1s)")


def test_endpoint_override_needs_a_cluster_check(doc: dict[str, Any]) -> None:
    del doc["clusters"][0]["health_check"]
    endpoint(doc)["health_check"] = {"interval": "2s"}
    assert_error(
        doc, "clusters[0].endpoints[0].health_check", "overrides a cluster health_check, but the cluster has none"
    )


def test_endpoint_may_have_its_own_check_when_the_cluster_has_none(doc: dict[str, Any]) -> None:
    del doc["clusters"][0]["health_check"]
    endpoint(doc, 1)["health_check"] = {"grpc": {}, "interval": "3s"}
    web = parse(doc).clusters[0]
    assert web.health_check is None
    assert web.endpoints[0].health_check is None
    assert web.endpoints[1].health_check == HealthCheck(kind="grpc", grpc=GrpcCheck(), interval=3.0)


# --------------------------------------------------------------------------- duplicates and references


def test_duplicate_cluster_names(doc: dict[str, Any]) -> None:
    doc["clusters"].append({"name": "web"})
    assert_error(doc, "clusters[1].name", "duplicate cluster name 'web' (also clusters[0])")


def test_duplicate_endpoints(doc: dict[str, Any]) -> None:
    doc["clusters"][0]["endpoints"].append({"address": "127.0.0.1", "port": 8081, "zone": "c"})
    assert_error(doc, "clusters[0].endpoints[2]", "duplicate endpoint 127.0.0.1:8081 (also at endpoints[0])")


def test_duplicate_endpoints_after_address_normalization(doc: dict[str, Any]) -> None:
    doc["clusters"][0]["endpoints"] = [{"address": "::1", "port": 80}, {"address": "0::0:1", "port": 80}]
    assert_error(doc, "clusters[0].endpoints[1]", "duplicate endpoint ::1:80 (also at endpoints[0])")


def test_same_endpoint_in_two_clusters_is_fine(doc: dict[str, Any]) -> None:
    doc["clusters"].append({"name": "api", "endpoints": [{"address": "127.0.0.1", "port": 8081}]})
    assert [c.name for c in parse(doc).clusters] == ["web", "api"]


def test_route_to_unknown_cluster(doc: dict[str, Any]) -> None:
    listener(doc)["routes"].append({"prefix": "/api", "cluster": "api"})
    assert_error(doc, "listeners[0].routes[1].cluster", "no cluster named 'api'")


def test_duplicate_listener_names(doc: dict[str, Any]) -> None:
    doc["listeners"].append({**listener(doc), "port": 10001})
    assert_error(doc, "listeners[1].name", "duplicate listener name 'ingress' (also listeners[0])")


@pytest.mark.parametrize(
    ("first_nodes", "second_nodes"),
    [(None, None), (["front"], None), (None, ["sidecar"]), (["front", "edge"], ["edge"])],
)
def test_duplicate_listener_address_on_shared_nodes(
    doc: dict[str, Any], first_nodes: list[str] | None, second_nodes: list[str] | None
) -> None:
    listener(doc)["nodes"] = first_nodes
    doc["listeners"].append({**listener(doc), "name": "other", "nodes": second_nodes})
    assert_error(doc, "listeners[1].port", "0.0.0.0:10000 is already used by listeners[0] (ingress) on the same nodes")


def test_same_listener_address_on_disjoint_nodes(doc: dict[str, Any]) -> None:
    listener(doc)["nodes"] = ["front"]
    doc["listeners"].append({**listener(doc), "name": "sidecar-ingress", "nodes": ["sidecar"]})
    topology = parse(doc)
    assert [(lst.name, lst.port, lst.nodes) for lst in topology.listeners] == [
        ("ingress", 10000, ("front",)),
        ("sidecar-ingress", 10000, ("sidecar",)),
    ]


def test_same_port_on_another_address(doc: dict[str, Any]) -> None:
    doc["listeners"].append({**listener(doc), "name": "local", "address": "127.0.0.1"})
    assert len(parse(doc).listeners) == 2


# --------------------------------------------------------------------------- listeners and routes


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("routes", [], "must have at least one route"),
        ("routes", None, "must be a list, got null"),
        ("domains", [], "must have at least one domain"),
        ("nodes", "front", "must be a list, got a string"),
        ("port", None, "is required"),
        ("address", "localhost", "'localhost' is not an IP address"),
        ("name", "in gress", "'in gress' does not match"),
    ],
)
def test_listener_field_errors(doc: dict[str, Any], field: str, value: Any, message: str) -> None:
    listener(doc)[field] = value
    assert_error(doc, f"listeners[0].{field}", message)


@pytest.mark.parametrize(
    ("route", "path", "message"),
    [
        ({"prefix": "/", "path": "/x", "cluster": "web"}, "", "give prefix or path, not both"),
        ({"prefix": "api", "cluster": "web"}, ".prefix", "must start with /"),
        ({"path": "x", "cluster": "web"}, ".path", "must start with /"),
        ({"prefix": "/"}, ".cluster", "is required"),
        ({"cluster": "web", "timeout": "-1s"}, ".timeout", "not a duration"),
    ],
)
def test_route_errors(doc: dict[str, Any], route: dict[str, Any], path: str, message: str) -> None:
    listener(doc)["routes"] = [route]
    assert_error(doc, f"listeners[0].routes[0]{path}", message)


def test_route_options(doc: dict[str, Any]) -> None:
    listener(doc)["routes"] = [
        {"path": "/exact", "cluster": "web", "timeout": "0s"},
        {"cluster": "web", "prefix_rewrite": "/v2/", "timeout": "15s"},
    ]
    assert parse(doc).listeners[0].routes == (
        Route(cluster="web", prefix=None, path="/exact", timeout=0.0),
        Route(cluster="web", prefix="/", timeout=15.0, prefix_rewrite="/v2/"),
    )


@pytest.mark.parametrize(
    ("section", "path", "message"),
    [
        ({"xds": {"port": 70000}}, "controlplane.xds.port", "must be 0..65535"),
        ({"admin": {"address": "a b"}}, "controlplane.admin.address", "'a b' is not an IP address or hostname"),
        ({"admin": {"address": "cp.local\n"}}, "controlplane.admin.address", "'cp.local\\n' is not an IP address"),
        ({"watch_interval": -1}, "controlplane.watch_interval", "must not be negative"),
        ({"xds": 18000}, "controlplane.xds", "must be a mapping, got int"),
    ],
)  # fmt: skip
def test_controlplane_errors(doc: dict[str, Any], section: dict[str, Any], path: str, message: str) -> None:
    doc["controlplane"] = section
    assert_error(doc, path, message)


def test_controlplane_defaults_fill_gaps(doc: dict[str, Any]) -> None:
    doc["controlplane"] = {"admin": {"address": "cp.local"}, "watch_interval": 0}
    assert parse(doc).controlplane == ControlPlaneConfig(
        xds=SocketAddress("127.0.0.1", 18000), admin=SocketAddress("cp.local", 19000), watch_interval=0.0
    )


# --------------------------------------------------------------------------- the envoy escape hatch


def test_envoy_fragment_is_kept(doc: dict[str, Any]) -> None:
    fragment = {"circuitBreakers": {"thresholds": [{"maxConnections": 10}]}, "dnsLookupFamily": "V4_ONLY"}
    doc["clusters"][0]["envoy"] = fragment
    assert parse(doc).clusters[0].envoy == fragment


@pytest.mark.parametrize(
    ("fragment", "mentions"),
    [
        ({"bogusField": 1}, "bogusField"),
        ({"commonLbConfig": {"nope": True}}, "nope"),
        ({"connectTimeout": "soon"}, "connectTimeout"),
        ({"lbPolicy": "FASTEST"}, "FASTEST"),
        ({"typedExtensionProtocolOptions": {"x": {"@type": None}}}, ""),  # json_format raises AttributeError
        ({"typedExtensionProtocolOptions": {"x": {"@type": "type.googleapis.com/google.protobuf.Struct"}}}, ""),
    ],
)
def test_envoy_fragment_is_validated_as_a_cluster(doc: dict[str, Any], fragment: dict[str, Any], mentions: str) -> None:
    doc["clusters"][0]["envoy"] = fragment
    error = assert_error(doc, "clusters[0].envoy", "not a valid envoy.config.cluster.v3.Cluster fragment: ")
    assert mentions in error.message


# --------------------------------------------------------------------------- text and files


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("a: b: c", "line 1, column 5", "mapping values are not allowed here"),
        ("clusters:\n  - name: web\n    endpoints: [\n", "line 4, column 1", "expected the node content"),
        ("clusters:\n\t- name: web\n", "line 2, column 1", "found character '\\t' that cannot start any token"),
    ],
)
def test_invalid_yaml_names_line_and_column(text: str, where: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology_text(text, source=SOURCE)
    assert info.value.path == where
    assert str(info.value).startswith(f"{SOURCE}: {where}: invalid YAML: {problem}")


def test_text_errors_name_the_source() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{SOURCE}: clusters[0].name: is required")):
        parse_topology_text("clusters: [{endpoints: []}]", source=SOURCE)


def test_load_topology(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(EXAMPLE)
    topology = load_topology(path)
    assert topology.source == str(path)
    assert topology == parse_topology_text(EXAMPLE, source=str(path))


def test_load_topology_errors_name_the_file(tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / "topology.yaml"
    endpoint(doc)["port"] = -1
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_topology(str(path))
    assert str(info.value) == f"{path}: clusters[0].endpoints[0].port: must be 1..65535"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "cannot read: No such file or directory"),
        (lambda p: p.mkdir(), "cannot read: Is a directory"),
        (lambda p: p.write_bytes(b"clusters: [\xff\xfe]"), "is not UTF-8 text"),
    ],
)
def test_unreadable_file(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "topology.yaml"
    make(path)
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert (info.value.source, info.value.path, info.value.message) == (str(path), "", message)
    assert str(info.value) == f"{path}: {message}"


# --------------------------------------------------------------------------- fuzzing

FIELD_NAMES = [
    "controlplane", "xds", "admin", "watch_interval", "address", "port", "clusters", "listeners", "name",
    "endpoints", "health_check", "connect_timeout", "lb_policy", "healthy_panic_threshold",
    "update_merge_window", "envoy", "zone", "region", "sub_zone", "weight", "hostname", "http", "tcp", "grpc",
    "path", "method", "host", "headers", "body", "expected_statuses", "expected_body", "https", "sni",
    "verify_tls", "keepalive", "keepalive_requests", "send", "receive", "hex", "text", "service", "authority",
    "interval", "timeout", "initial_jitter", "interval_jitter", "unhealthy_interval", "healthy_edge_interval",
    "unhealthy_edge_interval", "healthy_threshold", "unhealthy_threshold", "http_failures", "tcp_failures",
    "timeouts", "initial_status", "routes", "prefix", "cluster", "prefix_rewrite", "domains", "nodes",
    "connectTimeout", "commonLbConfig", "typedExtensionProtocolOptions", "@type", "value",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["1s", "500ms", "web", "127.0.0.1", "::1", "/", "0a0b", "ROUND_ROBIN", "healthy", "*"])
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=40,
)


@st.composite
def mutated_examples(draw: st.DrawFn) -> Any:
    """The example document with one value somewhere in it replaced, deleted, or joined by a new key."""
    document: Any = yaml.safe_load(EXAMPLE)
    parent: Any = None
    key: Any = None
    node = document
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        parent, key = node, draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        node = node[key]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "add" and isinstance(node, dict):
        node[draw(keys)] = draw(documents)
    elif action == "delete" and parent is not None:
        del parent[key]
    elif parent is not None:
        parent[key] = draw(documents)
    else:
        document = draw(documents)
    return document


def parse_or_config_error(document: Any) -> Topology | None:
    try:
        return parse_topology(document, source=SOURCE)
    except ConfigError as error:
        assert str(error), "a ConfigError must say something"
        assert str(error).startswith(f"{SOURCE}: ")
        return None


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])


@FUZZ
@given(documents)
def test_fuzz_random_documents_raise_only_config_errors(document: Any) -> None:
    parse_or_config_error(document)


@FUZZ
@given(st.dictionaries(st.sampled_from(["controlplane", "clusters", "listeners"]), documents))
def test_fuzz_random_sections_raise_only_config_errors(document: Any) -> None:
    parse_or_config_error(document)


@FUZZ
@given(mutated_examples())
def test_fuzz_mutated_example_raises_only_config_errors_and_builds(document: Any) -> None:
    topology = parse_or_config_error(document)
    if topology is not None:
        # What validation accepts, the resource builders must be able to serve.
        build_snapshot(
            topology, lambda cluster, endpoint: HealthStatus.UNKNOWN, version="1.1", cause=Cause("start", "", 0.0)
        )


# --------------------------------------------------------------------------- later additions


def _web(**cluster: object) -> dict[str, object]:
    return {"clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 8081}], **cluster}]}


@pytest.mark.parametrize("key", ["name", "type", "loadAssignment", "eds_cluster_config"])
def test_envoy_fragment_cannot_override_what_the_topology_owns(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"clusters\[0\]\.envoy\.{key}: is set by healthplane"):
        parse_topology(_web(envoy={key: "STATIC" if key == "type" else {}}))


def test_envoy_fragment_is_copied_deeply() -> None:
    fragment = {"circuit_breakers": {"thresholds": [{"max_connections": 10}]}}
    topology = parse_topology(_web(envoy=fragment))
    fragment["circuit_breakers"]["thresholds"][0]["max_connections"] = 99  # type: ignore[index]
    assert topology.clusters[0].envoy["circuit_breakers"]["thresholds"][0]["max_connections"] == 10


def test_header_values_cannot_smuggle_lines() -> None:
    with pytest.raises(ConfigError, match=r"health_check\.http\.headers\.X-A: header values cannot contain CR"):
        parse_topology(_web(health_check={"http": {"headers": {"X-A": "ok\r\nX-Evil: 1"}}}))


def test_endpoint_interval_override_below_the_inherited_timeout_is_an_error() -> None:
    doc = _web(health_check={"http": {}, "interval": "2s", "timeout": "1s"})
    doc["clusters"][0]["endpoints"][0]["health_check"] = {"interval": "500ms"}  # type: ignore[index]
    expected = r"endpoints\[0\]\.health_check\.interval: must not be shorter than the timeout \(1s\)"
    with pytest.raises(ConfigError, match=expected):
        parse_topology(doc)


def test_probers_replicas_defaults_to_one_and_is_validated_with_its_path(doc: dict[str, Any]) -> None:
    assert parse(doc).probers.replicas == 1
    assert parse({**doc, "probers": {"replicas": 3}}).probers.replicas == 3
    assert_error({**doc, "probers": {"replicas": 0}}, "probers.replicas", "must be")
    assert_error({**doc, "probers": {"replicas": "two"}}, "probers.replicas", "must be an integer, got")
    assert_error({**doc, "probers": {"replicas": 17}}, "probers.replicas", "must be")
    assert_error({**doc, "probers": {"replica": 2}}, "probers.replica", "unknown field (expected one of: replicas)")
    assert_error({**doc, "probers": [2]}, "probers", "must be a mapping, got")
