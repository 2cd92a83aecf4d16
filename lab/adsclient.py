"""A simulated ADS client (state of the world, and delta): the protocol bookkeeping, and a thin grpc.aio stream.

`AdsClient` is plain synchronous logic: it builds the DiscoveryRequests an Envoy would send
(the node on the first request only; a subscription carrying the version ACKed so far; an ACK
with the response's version and nonce; a NACK with the nonce, the previous version and an
`error_detail`) and tracks, per type URL, the names subscribed, the version ACKed and the last
nonce answered. `AdsStream` writes those requests on one ADS stream and reads the responses.
What a caller does between reading and answering (a modelled delay, counting, following
CDS with EDS) is its own: lab/fleet.py, tests/controlplane/xds/xds_fuzz.py, bench/fanout.py.

`DeltaAdsClient` and `DeltaAdsStream` do the same for incremental xDS (DeltaDiscoveryRequests on
`DeltaAggregatedResources`): subscriptions are changes (`resource_names_subscribe` and
`_unsubscribe`), an ACK names only the nonce, and the client keeps the resources it holds
(name -> version) to list them as `initial_resource_versions` on its next stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

__all__ = ["AdsClient", "AdsStream", "DeltaAdsClient", "DeltaAdsStream"]

_INVALID_ARGUMENT = 3  # google.rpc.Code of a NACK's error_detail, as Envoy sends it


class AdsClient:
    """Requests and per-type state of one simulated node on one ADS stream."""

    def __init__(self, node: base_pb2.Node) -> None:
        self.node = node
        self.names: dict[str, list[str]] = {}  # type URL -> resource names subscribed ([]: all)
        self.acked: dict[str, str] = {}  # type URL -> version ACKed
        self.nonces: dict[str, str] = {}  # type URL -> nonce of the last response answered
        self.node_sent = False

    def subscribed(self, type_url: str) -> bool:
        """Whether a request for `type_url` went out on the stream."""
        return type_url in self.names

    def subscribe(self, type_url: str, names: Iterable[str] = ()) -> discovery_pb2.DiscoveryRequest:
        """A request for `names` of `type_url` (every resource if none), with the version ACKed so far."""
        self.names[type_url] = list(names)
        return self._request(type_url, self.acked.get(type_url, ""), "")

    def ack(self, response: discovery_pb2.DiscoveryResponse) -> discovery_pb2.DiscoveryRequest:
        """The ACK of `response`: its version and nonce."""
        return self._request(response.type_url, response.version_info, response.nonce)

    def nack(self, response: discovery_pb2.DiscoveryResponse, message: str) -> discovery_pb2.DiscoveryRequest:
        """The NACK of `response`: its nonce, the version ACKed before, and `message` as error_detail."""
        request = self._request(response.type_url, self.acked.get(response.type_url, ""), response.nonce)
        request.error_detail.CopyFrom(status_pb2.Status(code=_INVALID_ARGUMENT, message=message))
        return request

    def sent(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Note that `request` was written: the node went out, and an ACK moves the version ACKed."""
        self.node_sent = True
        if request.response_nonce:
            self.nonces[request.type_url] = request.response_nonce
            if not request.HasField("error_detail"):
                self.acked[request.type_url] = request.version_info

    def _request(self, type_url: str, version: str, nonce: str) -> discovery_pb2.DiscoveryRequest:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=version,
            response_nonce=nonce,
            resource_names=self.names.setdefault(type_url, []),
        )
        if not self.node_sent:
            request.node.CopyFrom(self.node)
        return request


class AdsStream:
    """One StreamAggregatedResources call driven by an `AdsClient`."""

    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, client: AdsClient) -> None:
        self.call: Any = stub.StreamAggregatedResources()
        self.client = client

    async def send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Write `request`, then note it in the client's state."""
        await self.call.write(request)
        self.client.sent(request)

    async def read(self) -> discovery_pb2.DiscoveryResponse | None:
        """The next response; None once the server ended the stream."""
        response = await self.call.read()
        return None if response is grpc.aio.EOF else response

    def cancel(self) -> None:
        self.call.cancel()


class DeltaAdsClient:
    """Delta requests and per-type state of one simulated node; what it holds outlives a stream."""

    def __init__(self, node: base_pb2.Node, held: dict[str, dict[str, str]] | None = None) -> None:
        self.node = node
        self.names: dict[str, set[str]] = {}  # type URL -> names subscribed on this stream ("*": all)
        self.held = held if held is not None else {}  # type URL -> name -> version the node holds
        self.acked: dict[str, str] = {}  # type URL -> system_version_info of the last response ACKed
        self.nonces: dict[str, str] = {}  # type URL -> nonce of the last response answered
        self.node_sent = False
        self._answering: dict[str, str] = {}  # type URL -> version of the response being ACKed

    def subscribed(self, type_url: str) -> bool:
        return type_url in self.names

    def subscribe(
        self, type_url: str, names: Iterable[str] = (), unsubscribe: Iterable[str] = ()
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        """Subscribe `names` (the first request of a type: nothing means wildcard) and drop `unsubscribe`;
        the first request of a type lists what the node holds of it."""
        first = type_url not in self.names
        current = self.names.setdefault(type_url, set())
        add, drop = list(names), list(unsubscribe)
        current.update(add)
        current.difference_update(drop)
        request = self._request(type_url)
        request.resource_names_subscribe.extend(add)
        request.resource_names_unsubscribe.extend(drop)
        if first:
            held = self.held.get(type_url, {})
            request.initial_resource_versions.update(held)
        return request

    def apply(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        """What the node holds after accepting `response`."""
        held = self.held.setdefault(response.type_url, {})
        for resource in response.resources:
            held[resource.name] = resource.version
        for name in response.removed_resources:
            held.pop(name, None)

    def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        """Accept `response` and answer it with its nonce."""
        self.apply(response)
        self._answering[response.type_url] = response.system_version_info
        request = self._request(response.type_url)
        request.response_nonce = response.nonce
        return request

    def nack(self, response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> discovery_pb2.DeltaDiscoveryRequest:
        """Reject `response`: its nonce and `message` as error_detail; the node holds what it held."""
        request = self._request(response.type_url)
        request.response_nonce = response.nonce
        request.error_detail.CopyFrom(status_pb2.Status(code=_INVALID_ARGUMENT, message=message))
        return request

    def sent(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        self.node_sent = True
        if request.response_nonce:
            self.nonces[request.type_url] = request.response_nonce
            if not request.HasField("error_detail"):
                self.acked[request.type_url] = self._answering.pop(request.type_url, "")

    def _request(self, type_url: str) -> discovery_pb2.DeltaDiscoveryRequest:
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
        if not self.node_sent:
            request.node.CopyFrom(self.node)
        return request


class DeltaAdsStream:
    """One DeltaAggregatedResources call driven by a `DeltaAdsClient`."""

    def __init__(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, client: DeltaAdsClient) -> None:
        self.call: Any = stub.DeltaAggregatedResources()
        self.client = client

    async def send(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        await self.call.write(request)
        self.client.sent(request)

    async def read(self) -> discovery_pb2.DeltaDiscoveryResponse | None:
        response = await self.call.read()
        return None if response is grpc.aio.EOF else response

    def cancel(self) -> None:
        self.call.cancel()
