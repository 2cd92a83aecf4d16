"""Envoy xDS resources built from the topology and endpoint health (upb-backed protos).

Pure functions: topology in, protobuf messages out. Serialization and versioning are the
snapshot's job.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, json_format, wrappers_pb2
from google.protobuf.message import Message

from controlplane.health.store import HealthStatus
from controlplane.topology.model import Cluster, GrpcService, Listener, Topology

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Make before break: clusters first, then their endpoints, then listeners, then routes.
ADS_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}
# Types whose SotW responses must always carry every resource (xds_protocol, "Grouping
# Resources into Responses"); for the others a response may carry only what changed.
FULL_STATE_TYPES = frozenset({CLUSTER, LISTENER})

HealthLookup = Callable[[str, str], HealthStatus]

# The bootstrap's cluster for the control plane (xds/bootstrap.py): ADS and the access-log service.
XDS_CLUSTER = "healthplane_xds"
ACCESS_LOG_NAME = "healthplane_passive"
# issue 15: how long an Envoy buffers access-log entries before sending them. Envoy's default
# (1 s) would make fleet-wide passive health wait a second; docs/design.md has the figures that
# chose these (bench/passive.py).
ACCESS_LOG_FLUSH_INTERVAL = 0.050
ACCESS_LOG_BUFFER_BYTES = 16_384


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def build_cluster(cluster: Cluster) -> cluster_pb2.Cluster:
    """An EDS cluster whose endpoints come over ADS, with our panic and merge-window defaults."""
    msg = cluster_pb2.Cluster(
        name=cluster.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source()),
        connect_timeout=_duration(cluster.connect_timeout),
        lb_policy=cluster_pb2.Cluster.LbPolicy.Value(cluster.lb_policy),
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=cluster.healthy_panic_threshold),
            update_merge_window=_duration(cluster.update_merge_window),
        ),
    )
    if cluster.envoy:
        json_format.ParseDict(json.loads(json.dumps(cluster.envoy)), msg)
    return msg


def build_load_assignment(cluster: Cluster, health: HealthLookup) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints grouped by locality, each with its health_status and weight."""
    by_locality: dict[tuple[str, str, str], list[endpoint_components_pb2.LbEndpoint]] = {}
    weights: dict[tuple[str, str, str], int] = {}
    for ep in cluster.endpoints:
        locality = (ep.region, ep.zone, ep.sub_zone)
        lb_endpoint = endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=ep.address, port_value=ep.port)
                ),
                hostname=ep.hostname,
            ),
            health_status=health(cluster.name, ep.key).value,
            load_balancing_weight=wrappers_pb2.UInt32Value(value=ep.weight),
        )
        by_locality.setdefault(locality, []).append(lb_endpoint)
        weights[locality] = weights.get(locality, 0) + ep.weight
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster.name)
    for locality, lb_endpoints in by_locality.items():
        region, zone, sub_zone = locality
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=region, zone=zone, sub_zone=sub_zone),
                lb_endpoints=lb_endpoints,
                # Proxyless gRPC clients drop localities without a weight; Envoy ignores it
                # unless locality-weighted balancing is on.
                load_balancing_weight=wrappers_pb2.UInt32Value(value=weights[locality]),
            )
        )
    return cla


def logs_passive(listener: Listener, topology: Topology) -> bool:
    """Whether any of the listener's routes leads to a cluster with passive checks."""
    passive = {c.name for c in topology.clusters if c.passive is not None}
    return any(r.cluster in passive for r in listener.routes)


def passive_access_log() -> als_pb2.HttpGrpcAccessLogConfig:
    """Envoy's gRPC access logger, sending to healthplane over the bootstrap's xDS cluster."""
    common = als_pb2.CommonGrpcAccessLogConfig(
        log_name=ACCESS_LOG_NAME,
        transport_api_version=config_source_pb2.V3,
        buffer_flush_interval=_duration(ACCESS_LOG_FLUSH_INTERVAL),
        buffer_size_bytes=wrappers_pb2.UInt32Value(value=ACCESS_LOG_BUFFER_BYTES),
    )
    common.grpc_service.envoy_grpc.cluster_name = XDS_CLUSTER
    return als_pb2.HttpGrpcAccessLogConfig(common_config=common)


def build_listener(listener: Listener, *, access_log: bool = False) -> listener_pb2.Listener:
    """An HTTP listener whose routes come over ADS (RDS) under the listener's own name; with
    `access_log`, its requests are logged to healthplane for passive checks (issue 15)."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=listener.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=listener.name),
    )
    if access_log:
        logger = manager.access_log.add(name="envoy.access_loggers.http_grpc")
        logger.typed_config.Pack(passive_access_log())
    router = manager.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    msg = listener_pb2.Listener(
        name=listener.name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=listener.address, port_value=listener.port)
        ),
    )
    chain = msg.filter_chains.add()
    hcm_filter = chain.filters.add(name="envoy.filters.network.http_connection_manager")
    hcm_filter.typed_config.Pack(manager)
    return msg


def build_route_configuration(listener: Listener) -> route_pb2.RouteConfiguration:
    """The listener's routes: first match wins, in the order the topology lists them."""
    vhost = route_components_pb2.VirtualHost(name=listener.name, domains=list(listener.domains))
    for route in listener.routes:
        match = (
            route_components_pb2.RouteMatch(path=route.path)
            if route.path is not None
            else route_components_pb2.RouteMatch(prefix=route.prefix or "/")
        )
        action = route_components_pb2.RouteAction(cluster=route.cluster)
        if route.timeout is not None:
            action.timeout.CopyFrom(_duration(route.timeout))
        if route.prefix_rewrite is not None:
            action.prefix_rewrite = route.prefix_rewrite
        vhost.routes.append(route_components_pb2.Route(match=match, route=action))
    return route_pb2.RouteConfiguration(name=listener.name, virtual_hosts=[vhost])


def build_api_listener(service: GrpcService) -> listener_pb2.Listener:
    """What a proxyless gRPC client asks LDS for when it dials `xds:///NAME`: a listener named
    exactly NAME with no address, only an HttpConnectionManager (gRFC A27) whose routes come
    over RDS under the same name and whose last (here only) HTTP filter is the router (A39)."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=service.name,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=service.name),
    )
    router = manager.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    msg = listener_pb2.Listener(name=service.name)
    msg.api_listener.api_listener.Pack(manager)
    return msg


def build_grpc_route_configuration(service: GrpcService) -> route_pb2.RouteConfiguration:
    """The service's routes in one virtual host for the authority NAME; first match wins.

    gRPC honours a route's `max_stream_duration` (gRFC A31), not Envoy's `timeout`.
    """
    vhost = route_components_pb2.VirtualHost(name=service.name, domains=[service.name])
    for route in service.routes:
        if route.path is not None:
            match = route_components_pb2.RouteMatch(path=route.path)
        else:
            match = route_components_pb2.RouteMatch(prefix=route.prefix)
        action = route_components_pb2.RouteAction()
        if len(route.clusters) == 1:
            action.cluster = route.clusters[0].cluster
        else:
            for target in route.clusters:
                action.weighted_clusters.clusters.append(
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=target.cluster, weight=wrappers_pb2.UInt32Value(value=target.weight)
                    )
                )
        if route.timeout is not None:
            action.max_stream_duration.max_stream_duration.CopyFrom(_duration(route.timeout))
        vhost.routes.append(route_components_pb2.Route(match=match, route=action))
    return route_pb2.RouteConfiguration(name=service.name, virtual_hosts=[vhost])


def type_name(message: Message) -> str:
    return f"type.googleapis.com/{message.DESCRIPTOR.full_name}"
