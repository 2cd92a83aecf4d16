"""lab.adsclient: the requests a simulated ADS client sends, and its per-type state."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots import resources as rs
from lab.adsclient import AdsClient


def response(type_url: str, version: str, nonce: str) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce)


def test_node_on_the_first_request_only_and_acks_move_the_version() -> None:
    client = AdsClient(base_pb2.Node(id="n", cluster="c"))
    first = client.subscribe(rs.CLUSTER)
    assert first.node.id == "n" and first.type_url == rs.CLUSTER and not first.version_info
    client.sent(first)
    assert client.subscribed(rs.CLUSTER) and not client.subscribed(rs.ENDPOINT) and client.acked == {}

    ack = client.ack(response(rs.CLUSTER, "v1", "1"))
    assert not ack.HasField("node") and (ack.version_info, ack.response_nonce) == ("v1", "1")
    client.sent(ack)
    assert client.acked == {rs.CLUSTER: "v1"} and client.nonces == {rs.CLUSTER: "1"}

    eds = client.subscribe(rs.ENDPOINT, ["web"])
    assert list(eds.resource_names) == ["web"] and not eds.response_nonce and not eds.version_info


def test_a_nack_keeps_the_previous_version() -> None:
    client = AdsClient(base_pb2.Node(id="n"))
    client.sent(client.subscribe(rs.ENDPOINT, ["web"]))
    client.sent(client.ack(response(rs.ENDPOINT, "v1", "1")))
    nack = client.nack(response(rs.ENDPOINT, "v2", "2"), "bad")
    assert (nack.version_info, nack.response_nonce, list(nack.resource_names)) == ("v1", "2", ["web"])
    assert nack.error_detail.code == 3 and nack.error_detail.message == "bad"
    client.sent(nack)
    assert client.acked == {rs.ENDPOINT: "v1"} and client.nonces == {rs.ENDPOINT: "2"}
