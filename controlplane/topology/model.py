"""The topology as frozen dataclasses: clusters, endpoints, health checks, listeners, routes, gRPC services
and the control plane's own settings; `restart_only_changes` names the settings bound at start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from controlplane.topology.propagation import PropagationConfig
from controlplane.topology.security import (
    SecurityConfig,
    restart_only_change,
)
from controlplane.topology.store import StoreConfig

LbPolicy = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"]
InitialStatus = Literal["unknown", "healthy", "unhealthy"]


@dataclass(frozen=True, slots=True)
class SocketAddress:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    xds: SocketAddress = SocketAddress("127.0.0.1", 18000)
    admin: SocketAddress = SocketAddress("127.0.0.1", 19000)
    # Poll interval of the topology file watcher, seconds; 0 disables watching.
    watch_interval: float = 0.5
    # Bearer token for admin API changes (`admin.token`); None: HEALTHPLANE_ADMIN_TOKEN, if set.
    admin_token: str | None = field(default=None, repr=False)
    # issue 7a (faults): persistence, prober staleness, the mass-failure guard, stuck streams.
    # Where the last verdicts and overrides are kept across restarts (SQLite); None: not kept.
    data_dir: str | None = None
    # A remote prober silent for longer than this raises an alarm (/readyz 503); 0 disables.
    prober_staleness: float = 60.0
    # More than `mass_failure_share` of a cluster's endpoints failing within `mass_failure_window`
    # (and at least `mass_failure_min` of them): the failures beyond are held and an alarm raised.
    mass_failure_share: float = 0.5
    mass_failure_window: float = 10.0
    mass_failure_min: int = 3
    # An ADS stream with a response unanswered (no ACK/NACK) this long is closed; 0 disables.
    stuck_stream_timeout: float = 120.0
    # issue 7b: limits and TLS of the xDS and admin ports (controlplane/topology/security.py)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # issue 5: the propagation model and how many versions are tracked (controlplane.observe.propagation).
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    # issue 17: operator state shared by replicas in etcd (controlplane.store); None: this file and SQLite.
    store: StoreConfig | None = None


@dataclass(frozen=True, slots=True)
class HttpCheck:
    path: str = "/"
    method: str = "GET"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 399),)
    expected_body: str | None = None
    https: bool = False
    sni: str | None = None
    verify_tls: bool = True
    keepalive: bool = True
    keepalive_requests: int = 0  # 0: no limit per connection


@dataclass(frozen=True, slots=True)
class TcpCheck:
    send: bytes | None = None
    receive: bytes | None = None


@dataclass(frozen=True, slots=True)
class GrpcCheck:
    service: str = ""
    authority: str | None = None
    # TLS to the endpoint's gRPC port. ca_file: roots to verify it by (None: the system's);
    # cert_file/key_file: a client certificate, for endpoints that require mutual TLS;
    # sni: the name to verify (and send as SNI) instead of the endpoint's address.
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How the prober checks an endpoint; the knobs of Envoy, lua-resty-healthcheck and HAProxy."""

    kind: Literal["http", "tcp", "grpc"]
    http: HttpCheck | None = None
    tcp: TcpCheck | None = None
    grpc: GrpcCheck | None = None
    port: int | None = None  # check port when it differs from the serving port (nginx `port=`)
    interval: float = 5.0
    timeout: float = 1.0
    initial_jitter: float = 0.0
    interval_jitter_percent: float = 0.0
    unhealthy_interval: float | None = None
    healthy_edge_interval: float | None = None
    unhealthy_edge_interval: float | None = None
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    http_failures: int | None = None  # default: unhealthy_threshold
    tcp_failures: int | None = None
    timeouts: int | None = None
    initial_status: InitialStatus = "unknown"


@dataclass(frozen=True, slots=True)
class PassiveCheck:
    """Passive checks from real traffic (issue 15): APISIX's `checks.passive` names and meaning.

    Counts are consecutive, per endpoint, across every Envoy's access log; a failure count of 0
    turns that kind off. A passive verdict only takes an endpoint down, for `eject_for` at least
    (times the endpoint's recent ejections, up to `max_eject_for`, as Envoy's outlier detection).
    """

    unhealthy_statuses: tuple[tuple[int, int], ...] = ((429, 429), (500, 500), (503, 503))
    http_failures: int = 5
    tcp_failures: int = 2
    timeouts: int = 7
    healthy_statuses: tuple[tuple[int, int], ...] = ((200, 206), (300, 308))
    successes: int = 5
    eject_for: float = 30.0
    max_eject_for: float = 300.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    zone: str = ""
    region: str = ""
    sub_zone: str = ""
    weight: int = 1
    hostname: str = ""
    health_check: HealthCheck | None = None  # the cluster's policy with this endpoint's overrides

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    endpoints: tuple[Endpoint, ...]
    health_check: HealthCheck | None = None
    connect_timeout: float = 1.0
    lb_policy: LbPolicy = "ROUND_ROBIN"
    # Envoy's default panic threshold (50%) sends traffic to UNHEALTHY hosts once too few are
    # healthy; a control plane that knows the truth wants 0 unless the operator says otherwise.
    healthy_panic_threshold: float = 0.0
    # Envoy's default merge window (1 s) delays health-only EDS updates; 0 applies them at once.
    update_merge_window: float = 0.0
    # Raw Envoy Cluster fields merged over the generated resource (an escape hatch).
    envoy: Mapping[str, Any] = field(default_factory=dict)
    # issue 15: passive checks from the Envoys' access logs; None: off.
    passive: PassiveCheck | None = None

    def endpoint(self, key: str) -> Endpoint | None:
        for ep in self.endpoints:
            if ep.key == key:
                return ep
        return None


@dataclass(frozen=True, slots=True)
class Route:
    cluster: str
    prefix: str | None = "/"
    path: str | None = None
    timeout: float | None = None
    prefix_rewrite: str | None = None


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: str
    port: int
    routes: tuple[Route, ...]
    domains: tuple[str, ...] = ("*",)
    # Node clusters (Envoy's --service-cluster) this listener is for; None: every node.
    nodes: tuple[str, ...] | None = None

    def for_node(self, node_cluster: str) -> bool:
        return self.nodes is None or node_cluster in self.nodes


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class GrpcRoute:
    """One route of a gRPC service: which calls (all, a service's, one method) go to which clusters."""

    clusters: tuple[WeightedCluster, ...]  # one entry: all calls to it; several: split by weight
    service: str | None = None  # "pkg.Service": matches the path prefix "/pkg.Service/"
    method: str | None = None  # with service: matches exactly "/pkg.Service/Method"
    timeout: float | None = None  # max_stream_duration: a deadline for calls without a shorter one

    @property
    def path(self) -> str | None:
        return f"/{self.service}/{self.method}" if self.service and self.method else None

    @property
    def prefix(self) -> str:
        return f"/{self.service}/" if self.service else ""


@dataclass(frozen=True, slots=True)
class GrpcService:
    """A name proxyless gRPC clients dial as `xds:///NAME`: an API listener and its routes."""

    name: str
    routes: tuple[GrpcRoute, ...]


@dataclass(frozen=True, slots=True)
class ProbersConfig:
    """How remote probers share the endpoints (issue 17): each is checked by `replicas` of them."""

    replicas: int = 1


@dataclass(frozen=True, slots=True)
class Topology:
    controlplane: ControlPlaneConfig = ControlPlaneConfig()
    clusters: tuple[Cluster, ...] = ()
    listeners: tuple[Listener, ...] = ()
    grpc_services: tuple[GrpcService, ...] = ()
    probers: ProbersConfig = ProbersConfig()
    source: str = ""
    # The validated document as given (plain JSON types), e.g. for sending clusters to probers.
    document: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def cluster(self, name: str) -> Cluster | None:
        for c in self.clusters:
            if c.name == name:
                return c
        return None


def restart_only_changes(running: ControlPlaneConfig, new: ControlPlaneConfig) -> list[str]:
    """Field paths of settings that differ and apply only when the control plane starts."""
    out = [f"controlplane.{name}" for name in ("xds", "admin") if getattr(running, name) != getattr(new, name)]
    if running.data_dir != new.data_dir:
        out.append("controlplane.data_dir")
    if running.store != new.store:
        out.append("controlplane.store")
    if (security := restart_only_change(running.security, new.security)) is not None:
        out.append(security)
    return out


def keep_running_settings(running: ControlPlaneConfig, new: ControlPlaneConfig) -> ControlPlaneConfig:
    """`new` with the start-only settings of `running` (the ports, data_dir, store, TLS and limits)."""
    security = replace(running.security, admin_read_token=new.security.admin_read_token)
    return replace(
        new, xds=running.xds, admin=running.admin, data_dir=running.data_dir, store=running.store, security=security
    )
