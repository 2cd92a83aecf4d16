"""lab.adsclient: the requests a simulated ADS client sends, and its per-type state."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots import resources as rs
from lab.adsclient import AdsClient, DeltaAdsClient


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


def delta_response(
    type_url: str, version: str, nonce: str, held: dict[str, str], removed: tuple[str, ...] = ()
) -> discovery_pb2.DeltaDiscoveryResponse:
    message = discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url, system_version_info=version, nonce=nonce, removed_resources=list(removed)
    )
    for name, v in held.items():
        message.resources.add(name=name, version=v)
    return message


def test_delta_client_subscribes_changes_acks_nonces_and_lists_what_it_holds() -> None:
    client = DeltaAdsClient(base_pb2.Node(id="n"))
    first = client.subscribe(rs.CLUSTER)
    assert first.node.id == "n" and list(first.resource_names_subscribe) == [] and not first.initial_resource_versions
    client.sent(first)
    ack = client.ack(delta_response(rs.CLUSTER, "v1", "1", {"web": "a", "api": "b"}))
    assert not ack.HasField("node") and ack.response_nonce == "1" and not ack.HasField("error_detail")
    client.sent(ack)
    assert client.acked == {rs.CLUSTER: "v1"} and client.held[rs.CLUSTER] == {"web": "a", "api": "b"}

    client.sent(client.subscribe(rs.ENDPOINT, ["web", "api"]))
    change = client.subscribe(rs.ENDPOINT, ["new"], ["api"])
    assert list(change.resource_names_subscribe) == ["new"] and list(change.resource_names_unsubscribe) == ["api"]
    assert client.names[rs.ENDPOINT] == {"web", "new"}

    nack = client.nack(delta_response(rs.CLUSTER, "v2", "2", {"web": "c"}, removed=("api",)), "bad")
    client.sent(nack)
    assert nack.error_detail.message == "bad" and client.acked == {rs.CLUSTER: "v1"}
    assert client.held[rs.CLUSTER] == {"web": "a", "api": "b"}  # a NACK changes nothing held
    client.sent(client.ack(delta_response(rs.CLUSTER, "v3", "3", {"web": "c"}, removed=("api",))))
    assert client.held[rs.CLUSTER] == {"web": "c"}

    again = DeltaAdsClient(base_pb2.Node(id="n"), client.held)  # the next stream
    assert dict(again.subscribe(rs.CLUSTER).initial_resource_versions) == {"web": "c"}
