"""Limits on the xDS port: request size and shape (parsed here, not by gRPC, to name the field), streams
per peer, and their counters; a refused request is a `LimitExceeded` mapped to a gRPC status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from prometheus_client.core import CounterMetricFamily, Metric

from controlplane.errors import LimitExceeded, ProtocolError
from controlplane.topology.security import SecurityConfig

log = logging.getLogger("healthplane.security")


def xds_limit_metrics(ads: Any) -> Iterator[Metric]:
    """Scrape-time counters of the streams the limits and the request checks ended."""
    ended = CounterMetricFamily(
        "healthplane_xds_streams_ended_by_server",
        "ADS streams the server ended with an error status (bad or oversized requests, limits), by code.",
        labels=["code"],
    )
    for code, n in sorted(ads.ended_with.items()):
        ended.add_metric([code], n)
    yield ended
    refused = CounterMetricFamily(
        "healthplane_xds_streams_refused_per_peer",
        "ADS streams refused because their peer held controlplane.xds.max_streams_per_peer already.",
    )
    refused.add_metric([], ads.peers.refused)
    yield refused


def configure_ads(ads: Any, security: SecurityConfig, *others: Any) -> None:
    """Apply the message and per-peer stream limits to an `AdsServer`, and the per-peer stream
    limit to the other streaming services on the xDS port (`others`, each with `peers`: the
    prober link, CSDS, the access-log service), each counted on its own."""
    ads.max_message_bytes = security.xds_max_message_bytes
    ads.peers.limit = security.xds_max_streams_per_peer
    for service in others:
        service.peers.limit = security.xds_max_streams_per_peer


def status_code(error: ProtocolError) -> grpc.StatusCode:
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, LimitExceeded) else grpc.StatusCode.INVALID_ARGUMENT


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host.strip("[]")
    return peer


class PeerStreams:
    """Open ADS streams per peer address, against `controlplane.xds.max_streams_per_peer`."""

    def __init__(self, limit: int = 0, kind: str = "ADS") -> None:
        self.limit = limit
        self.kind = kind  # what the streams are, for the message: ADS, prober-link, CSDS
        self.open: dict[str, int] = {}
        self.refused = 0

    def acquire(self, peer: str) -> str:
        """Count one more stream for `peer`; LimitExceeded when it already holds `limit`. Returns the key."""
        host = peer_host(peer)
        held = self.open.get(host, 0)
        if self.limit and held >= self.limit:
            self.refused += 1
            raise LimitExceeded(
                f"{host} already holds {held} {self.kind} streams: "
                f"controlplane.xds.max_streams_per_peer is {self.limit}"
            )
        self.open[host] = held + 1
        return host

    def release(self, host: str) -> None:
        held = self.open.get(host, 0) - 1
        if held > 0:
            self.open[host] = held
        else:
            self.open.pop(host, None)


# --------------------------------------------------------------------------- DiscoveryRequests

MAX_RESOURCE_NAMES = 100_000
MAX_FIELD_BYTES = 4096
# A message this small cannot break the limits below: no field is longer than the message, and
# each listed name takes at least two bytes. Most requests (ACKs, small subscriptions) are.
_SMALL = min(MAX_FIELD_BYTES, 2 * MAX_RESOURCE_NAMES)


def parse_request(data: bytes, max_bytes: int) -> Any:
    """One DiscoveryRequest from the wire, within the limits; LimitExceeded or ProtocolError naming the field."""
    if len(data) > max_bytes:
        raise LimitExceeded(
            f"DiscoveryRequest of {len(data)} bytes is over controlplane.xds.max_message_bytes ({max_bytes})"
        )
    try:
        request = discovery_pb2.DiscoveryRequest.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"DiscoveryRequest does not parse ({len(data)} bytes): {exc}") from None
    if len(data) <= _SMALL:
        return request
    if len(request.resource_names) > MAX_RESOURCE_NAMES:
        raise LimitExceeded(
            f"resource_names lists {len(request.resource_names)} names, more than {MAX_RESOURCE_NAMES} allowed"
        )
    for name in ("type_url", "version_info", "response_nonce"):
        value: str = getattr(request, name)
        if len(value) > MAX_FIELD_BYTES:
            raise ProtocolError(f"{name} is {len(value)} characters long, more than {MAX_FIELD_BYTES} allowed")
    return request


def parse_delta_request(data: bytes, max_bytes: int) -> Any:
    """One DeltaDiscoveryRequest from the wire, within the limits; LimitExceeded or ProtocolError naming the field."""
    if len(data) > max_bytes:
        raise LimitExceeded(
            f"DeltaDiscoveryRequest of {len(data)} bytes is over controlplane.xds.max_message_bytes ({max_bytes})"
        )
    try:
        request = discovery_pb2.DeltaDiscoveryRequest.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"DeltaDiscoveryRequest does not parse ({len(data)} bytes): {exc}") from None
    if len(data) <= _SMALL:
        return request
    for name in ("resource_names_subscribe", "resource_names_unsubscribe", "initial_resource_versions"):
        count = len(getattr(request, name))
        if count > MAX_RESOURCE_NAMES:
            raise LimitExceeded(f"{name} lists {count} names, more than {MAX_RESOURCE_NAMES} allowed")
    for name in ("type_url", "response_nonce"):
        value: str = getattr(request, name)
        if len(value) > MAX_FIELD_BYTES:
            raise ProtocolError(f"{name} is {len(value)} characters long, more than {MAX_FIELD_BYTES} allowed")
    return request
