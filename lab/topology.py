"""The lab's layout: which process listens where, what the control plane serves, each Envoy's bootstrap.

Pure: a `LabConfig` in, a `LabLayout` and plain documents out; `lab/run.py` starts the processes.
The layout mirrors docker-compose.yaml: a front proxy routing to three sidecars, each sidecar
routing to its own demo app. Two ways to give every process its own address:

- loopback (default): everything on 127.0.0.1, each sidecar and demo app on its own port;
- `--netns`: each backend (sidecar + demo app) in its own network namespace with its own address
  in a private subnet, on the ports the compose file uses (sidecar :80, app 127.0.0.1:8080).

And two ways to health-check the backends, which `healthplane lab compare` puts side by side:

- `central`: healthplane's prober checks every sidecar once per interval and pushes the verdict
  over EDS to every Envoy (the topology below);
- `per-envoy`: the classic static config, each front proxy runs Envoy's own active HTTP check
  with the same interval, timeout and thresholds (`front_bootstrap` in that mode).
"""

from __future__ import annotations

import argparse
import enum
import errno
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controlplane.errors import ConfigError, LabError
from controlplane.topology.durations import format_duration, parse_duration
from controlplane.xds.bootstrap import make_bootstrap

__all__ = [
    "BACKENDS",
    "GRPC_BACKENDS",
    "GRPC_CLIENT_NODE",
    "GRPC_SERVICE",
    "BackendLayout",
    "FrontLayout",
    "HealthCheckSpec",
    "LabConfig",
    "LabError",
    "LabLayout",
    "Mode",
    "PortPlan",
    "add_lab_arguments",
    "check_ports_free",
    "config_from_args",
    "front_bootstrap",
    "make_layout",
    "sidecar_bootstrap",
    "topology_document",
    "with_grpc_ports",
]

# The compose file's three backends: each name is the demo app's ServerName and its sidecar's
# node cluster (Envoy --service-cluster).
BACKENDS = ("webserver01", "webserver02", "webserver03")
LOOPBACK = "127.0.0.1"
FRONT_NODE_CLUSTER = "front-proxy"
WEB_CLUSTER = "web"
# `lab --grpc`: gRPC demo servers behind service `greeter`, dialled as xds:///greeter.
GRPC_BACKENDS = ("grpc01", "grpc02", "grpc03")
GRPC_SERVICE = "greeter"
GRPC_CLIENT_NODE = "grpc-client"
# Inside a backend's namespace: the ports docker-compose.yaml uses in each container.
NETNS_SIDECAR_PORT = 80
NETNS_SIDECAR_ADMIN_PORT = 9901
NETNS_APP_PORT = 8080
# Host offsets in the lab subnet: the bridge, then the backends (compose: .11, .12, .13).
_BRIDGE_HOST = 1
_FIRST_BACKEND_HOST = 11
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,7}")
DEFAULT_SUBNET = ipaddress.IPv4Network("10.200.0.0/24")


class Mode(enum.Enum):
    """Who health-checks the backends."""

    CENTRAL = "central"  # healthplane's prober, verdicts over EDS
    PER_ENVOY = "per-envoy"  # every front proxy runs Envoy's own active health check

    @property
    def title(self) -> str:
        return "central prober" if self is Mode.CENTRAL else "per-Envoy health checks"


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    """The HTTP /livez check of the `web` cluster, identical in both modes."""

    path: str = "/livez"
    interval: float = 1.0
    timeout: float = 0.5
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2

    def detection_bound(self, slack: float) -> float:
        """Latest a failing backend may still get traffic: every failing check, one timeout, slack."""
        return self.unhealthy_threshold * self.interval + self.timeout + slack

    def recovery_bound(self, slack: float) -> float:
        """Latest a recovered backend may wait for traffic again."""
        return self.healthy_threshold * self.interval + self.timeout + slack

    def describe(self) -> str:
        return (
            f"GET {self.path} every {format_duration(self.interval)} (timeout {format_duration(self.timeout)}, "
            f"healthy {self.healthy_threshold}, unhealthy {self.unhealthy_threshold})"
        )

    def topology(self, kind: str = "http") -> dict[str, Any]:
        """The cluster's `health_check` in healthplane's topology schema (`grpc`: grpc.health.v1)."""
        return {
            **({"http": {"path": self.path}} if kind == "http" else {"grpc": {}}),
            "interval": format_duration(self.interval),
            "timeout": format_duration(self.timeout),
            "healthy_threshold": self.healthy_threshold,
            "unhealthy_threshold": self.unhealthy_threshold,
        }

    def envoy(self) -> dict[str, Any]:
        """The same check as an Envoy `core.v3.HealthCheck`."""
        interval = _envoy_duration(self.interval)
        return {
            "timeout": _envoy_duration(self.timeout),
            "interval": interval,
            # Envoy checks a cluster that has never had traffic only every 60 s by default; a
            # front proxy that has not been sent a request yet would then lag the others.
            "no_traffic_interval": interval,
            "unhealthy_threshold": self.unhealthy_threshold,
            "healthy_threshold": self.healthy_threshold,
            "http_health_check": {
                "path": self.path,
                # Envoy's range ends are exclusive: 200..399, the prober's default `[[200, 399]]`.
                "expected_statuses": [{"start": 200, "end": 400}],
                # Without it Envoy ignores unhealthy_threshold for an unexpected status and fails
                # the host at the first one (its docs, `unhealthy_threshold`); the prober counts
                # such a status as an http_failure against the threshold. Same thresholds, same
                # meaning: a status failure is "retriable", counted like a connection failure.
                "retriable_statuses": [{"start": 400, "end": 600}],
            },
        }


def _envoy_duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


@dataclass(frozen=True, slots=True)
class PortPlan:
    """Ports the lab binds on the host (in the root namespace); the defaults are documented."""

    front_listener: int = 10000
    front_admin: int = 9901
    controlplane_admin: int = 19000
    xds: int = 18000
    sidecar_listeners: tuple[int, ...] = (10001, 10002, 10003)
    sidecar_admins: tuple[int, ...] = (9902, 9903, 9904)
    apps: tuple[int, ...] = (8081, 8082, 8083)

    @classmethod
    def from_base(cls, base: int) -> PortPlan:
        """Thirteen consecutive ports from `base`, in the order of the fields."""
        return cls._from_list(list(range(base, base + 4 + 3 * len(BACKENDS))))

    @classmethod
    def free(cls) -> PortPlan:
        """Ports that were free a moment ago, all different (for tests and `--ports-base 0`)."""
        n = len(BACKENDS)
        socks: list[socket.socket] = []
        try:
            # Hold every socket until all are picked, so the kernel never hands out one twice.
            for _ in range(4 + 3 * n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((LOOPBACK, 0))
            ports = [int(s.getsockname()[1]) for s in socks]
        finally:
            for s in socks:
                s.close()
        return cls._from_list(ports)

    @classmethod
    def _from_list(cls, ports: list[int]) -> PortPlan:
        """The ports in the order of the fields."""
        n = len(BACKENDS)
        return cls(
            front_listener=ports[0],
            front_admin=ports[1],
            controlplane_admin=ports[2],
            xds=ports[3],
            sidecar_listeners=tuple(ports[4 : 4 + n]),
            sidecar_admins=tuple(ports[4 + n : 4 + 2 * n]),
            apps=tuple(ports[4 + 2 * n : 4 + 3 * n]),
        )

    @classmethod
    def resolve(cls, base: int | None) -> PortPlan:
        """None: the documented ports; 0: free ports; N: a block of consecutive ports from N."""
        if base is None:
            return cls()
        if base == 0:
            return cls.free()
        return cls.from_base(base)

    def host_ports(self, *, netns: bool, mode: Mode) -> list[tuple[int, str]]:
        """(port, what) for every port bound on the host; backends in namespaces bind none here."""
        ports = [(self.front_listener, "front proxy listener"), (self.front_admin, "front proxy admin")]
        if mode is Mode.CENTRAL:
            ports += [(self.controlplane_admin, "control-plane admin"), (self.xds, "control-plane xDS")]
        if not netns:
            for i, name in enumerate(BACKENDS):
                ports += [
                    (self.sidecar_listeners[i], f"{name} sidecar listener"),
                    (self.sidecar_admins[i], f"{name} sidecar admin"),
                    (self.apps[i], f"{name} demo app"),
                ]
        return ports


@dataclass(frozen=True, slots=True)
class LabConfig:
    """Everything `healthplane lab` can be told; `make_layout` turns it into addresses and ports."""

    mode: Mode = Mode.CENTRAL
    netns: bool = False
    # None: the documented fixed ports; 0: any free ports; N: the block N..N+12.
    ports_base: int | None = None
    health_check: HealthCheckSpec = field(default_factory=HealthCheckSpec)
    front_proxies: int = 1
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET
    # Names of the namespaces, bridge and veths start with it (interface names: 15 bytes at most).
    netns_prefix: str = "hplab"
    workdir: Path | None = None
    envoy_log_level: str = "warning"
    delta: bool = False  # the Envoys speak incremental xDS (DELTA_GRPC) to the control plane
    grpc: bool = False  # also gRPC demo servers and a proxyless client (xds:///greeter)

    def __post_init__(self) -> None:
        if self.grpc and self.mode is not Mode.CENTRAL:
            raise ConfigError("needs the central prober and control plane (--mode central)", path="--grpc")
        hc = self.health_check
        if hc.interval <= 0:
            raise ConfigError("must be more than 0", path="--interval")
        if not 0 < hc.timeout <= hc.interval:
            raise ConfigError("must be more than 0 and at most --interval", path="--timeout")
        if hc.healthy_threshold < 1:
            raise ConfigError("must be at least 1", path="--healthy-threshold")
        if hc.unhealthy_threshold < 1:
            raise ConfigError("must be at least 1", path="--unhealthy-threshold")
        if not 1 <= self.front_proxies <= 100:
            raise ConfigError("must be 1..100", path="--front-proxies")
        if self.ports_base is not None and not (
            self.ports_base == 0 or 1024 <= self.ports_base <= 65535 - 3 * len(BACKENDS) - 4
        ):
            raise ConfigError("must be 0 (any free ports) or 1024..65522", path="--ports-base")
        if self.subnet.prefixlen > 27 or not self.subnet.is_private:
            raise ConfigError(
                "must be a private IPv4 subnet of at least 32 addresses, e.g. 10.200.0.0/24", path="--subnet"
            )
        if not _PREFIX.fullmatch(self.netns_prefix):
            raise ConfigError("must be a lowercase letter then up to 7 letters or digits", path="--netns-prefix")


@dataclass(frozen=True, slots=True)
class BackendLayout:
    """One backend: a demo app and its sidecar Envoy, in a namespace of its own with --netns."""

    name: str
    node_id: str
    address: str  # where the front proxies and the prober reach the sidecar
    listener_port: int
    admin_address: str
    admin_port: int
    app_port: int  # the demo app listens on 127.0.0.1 (inside its namespace with --netns)
    netns: str | None = None
    veth: str | None = None  # the host end of the namespace's veth pair
    cidr: str | None = None  # the namespace's address with its prefix length

    @property
    def url(self) -> str:
        """The sidecar listener: `/` and `/livez` reach the demo app through it."""
        return f"http://{self.address}:{self.listener_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_address}:{self.admin_port}"

    @property
    def endpoint(self) -> str:
        """The `address:port` key of this backend in cluster `web`."""
        return f"{self.address}:{self.listener_port}"

    @property
    def local_cluster(self) -> str:
        # Clusters go to every node, so on loopback each sidecar needs its own (its app's port);
        # in namespaces every app is at 127.0.0.1:8080, as in the compose topology.
        return "local_app" if self.netns else f"local_{self.name}"

    @property
    def listener_name(self) -> str:
        return "sidecar_ingress" if self.netns else f"sidecar_ingress_{self.name}"


@dataclass(frozen=True, slots=True)
class FrontLayout:
    """One front proxy; they all share the listener port (SO_REUSEPORT: the kernel balances)."""

    node_id: str
    listener_port: int
    admin_port: int  # 0: any free port (every front proxy after the first)


@dataclass(frozen=True, slots=True)
class LabLayout:
    """Every address and port of one lab run."""

    config: LabConfig
    ports: PortPlan
    xds_address: str
    backends: tuple[BackendLayout, ...]
    fronts: tuple[FrontLayout, ...]
    bridge: str | None = None
    bridge_cidr: str | None = None
    grpc_ports: tuple[int, ...] = ()  # `--grpc`: the gRPC demo servers', on 127.0.0.1, any free ones

    @property
    def front_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.front_listener}"

    @property
    def controlplane_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.controlplane_admin}"

    @property
    def health_check(self) -> HealthCheckSpec:
        return self.config.health_check

    def backend(self, name: str) -> BackendLayout:
        for b in self.backends:
            if b.name == name:
                return b
        raise ConfigError(f"no backend named {name!r} (one of {', '.join(BACKENDS)})", path="--fail")


def make_layout(config: LabConfig, ports: PortPlan) -> LabLayout:
    """Addresses, ports and names of every process for `config`, given the host ports to use."""
    fronts = tuple(
        FrontLayout(
            node_id="front-envoy" if i == 0 else f"front-envoy-{i + 1}",
            listener_port=ports.front_listener,
            admin_port=ports.front_admin if i == 0 else 0,
        )
        for i in range(config.front_proxies)
    )
    if not config.netns:
        backends = tuple(
            BackendLayout(
                name=name,
                node_id=f"{name}-sidecar",
                address=LOOPBACK,
                listener_port=ports.sidecar_listeners[i],
                admin_address=LOOPBACK,
                admin_port=ports.sidecar_admins[i],
                app_port=ports.apps[i],
            )
            for i, name in enumerate(BACKENDS)
        )
        return LabLayout(config, ports, LOOPBACK, backends, fronts)
    hosts = list(config.subnet.hosts())
    prefix = config.netns_prefix
    bridge_ip = hosts[_BRIDGE_HOST - 1]
    in_netns: list[BackendLayout] = []
    for i, name in enumerate(BACKENDS):
        ip = hosts[_FIRST_BACKEND_HOST - 1 + i]
        in_netns.append(
            BackendLayout(
                name=name,
                node_id=f"{name}-sidecar",
                address=str(ip),
                listener_port=NETNS_SIDECAR_PORT,
                admin_address=str(ip),
                admin_port=NETNS_SIDECAR_ADMIN_PORT,
                app_port=NETNS_APP_PORT,
                netns=f"{prefix}-{name}",
                veth=f"{prefix}-v{i + 1}",
                cidr=f"{ip}/{config.subnet.prefixlen}",
            )
        )
    return LabLayout(
        config,
        ports,
        # The sidecars reach the control plane at the bridge's address, and so does the front.
        str(bridge_ip),
        tuple(in_netns),
        fronts,
        bridge=f"{prefix}-br",
        bridge_cidr=f"{bridge_ip}/{config.subnet.prefixlen}",
    )


def with_grpc_ports(layout: LabLayout) -> LabLayout:
    """The layout with free loopback ports for the gRPC demo servers (when `--grpc`)."""
    if not layout.config.grpc:
        return layout
    socks: list[socket.socket] = []
    try:
        for _ in GRPC_BACKENDS:  # held together, so no port is handed out twice
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((LOOPBACK, 0))
        ports = tuple(int(s.getsockname()[1]) for s in socks)
    finally:
        for s in socks:
            s.close()
    return replace(layout, grpc_ports=ports)


def check_ports_free(layout: LabLayout) -> None:
    """ConfigError naming the first host port already in use and the option that changes it."""
    config = layout.config
    for port, what in layout.ports.host_ports(netns=config.netns, mode=config.mode):
        if port == 0:
            continue
        address = layout.xds_address if what == "control-plane xDS" else LOOPBACK
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # Like the servers themselves: a port held only by TIME_WAIT sockets counts as free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise ConfigError(
                    f"port {port} ({what}) on {address} is already in use; run the lab on other ports "
                    "with --ports-base N (N..N+12) or --ports-base 0 (any free ports)",
                    path="--ports-base",
                ) from exc


# ----------------------------------------------------------------------------- documents


def topology_document(layout: LabLayout) -> dict[str, Any]:
    """What the control plane serves in central mode: examples/compose-topology.yaml, relocated."""
    config = layout.config
    backends = layout.backends
    clusters: list[dict[str, Any]] = [
        {
            "name": WEB_CLUSTER,
            "endpoints": [{"address": b.address, "port": b.listener_port} for b in backends],
            "health_check": config.health_check.topology(),
        }
    ]
    listeners: list[dict[str, Any]] = [
        {
            "name": "ingress",
            "address": LOOPBACK,
            "port": layout.ports.front_listener,
            "routes": [{"prefix": "/", "cluster": WEB_CLUSTER}],
            "nodes": [FRONT_NODE_CLUSTER],
        }
    ]
    if config.netns:
        clusters.append({"name": "local_app", "endpoints": [{"address": LOOPBACK, "port": NETNS_APP_PORT}]})
        listeners.append(
            {
                "name": "sidecar_ingress",
                "address": "0.0.0.0",
                "port": NETNS_SIDECAR_PORT,
                "routes": [{"prefix": "/", "cluster": "local_app"}],
                "nodes": [b.name for b in backends],
            }
        )
    else:
        for b in backends:
            clusters.append({"name": b.local_cluster, "endpoints": [{"address": LOOPBACK, "port": b.app_port}]})
            listeners.append(
                {
                    "name": b.listener_name,
                    "address": b.address,
                    "port": b.listener_port,
                    "routes": [{"prefix": "/", "cluster": b.local_cluster}],
                    "nodes": [b.name],
                }
            )
    document: dict[str, Any] = {
        "controlplane": {
            "xds": {"address": layout.xds_address, "port": layout.ports.xds},
            "admin": {"address": LOOPBACK, "port": layout.ports.controlplane_admin},
            "watch_interval": "500ms",
        },
        "clusters": clusters,
        "listeners": listeners,
    }
    if layout.grpc_ports:
        clusters.append(
            {
                "name": GRPC_SERVICE,
                "endpoints": [{"address": LOOPBACK, "port": p} for p in layout.grpc_ports],
                "health_check": config.health_check.topology("grpc"),
            }
        )
        document["grpc_services"] = [{"name": GRPC_SERVICE, "cluster": GRPC_SERVICE}]
    return document


def front_bootstrap(layout: LabLayout, front: FrontLayout) -> dict[str, Any]:
    """A front proxy's bootstrap: over ADS (central) or the classic static one (per-envoy)."""
    if layout.config.mode is Mode.CENTRAL:
        return make_bootstrap(
            node_id=front.node_id,
            service=FRONT_NODE_CLUSTER,
            xds_host=layout.xds_address,
            xds_port=layout.ports.xds,
            admin_port=front.admin_port,
            delta=layout.config.delta,
        )
    web = _static_cluster(
        WEB_CLUSTER,
        [(b.address, b.listener_port) for b in layout.backends],
        health_check=layout.health_check.envoy(),
    )
    return _static_bootstrap(
        front.node_id, FRONT_NODE_CLUSTER, LOOPBACK, front.admin_port,
        _static_listener("ingress", LOOPBACK, front.listener_port, WEB_CLUSTER), web,
    )  # fmt: skip


def sidecar_bootstrap(layout: LabLayout, backend: BackendLayout) -> dict[str, Any]:
    """A sidecar's bootstrap: over ADS (central) or static, without a health check (per-envoy)."""
    if layout.config.mode is Mode.CENTRAL:
        return make_bootstrap(
            node_id=backend.node_id,
            service=backend.name,
            xds_host=layout.xds_address,
            xds_port=layout.ports.xds,
            admin_port=backend.admin_port,
            admin_address=backend.admin_address,
            delta=layout.config.delta,
        )
    # The classic demo's sidecars only forward to their app; the front proxies do the checking.
    listen = "0.0.0.0" if backend.netns else backend.address
    return _static_bootstrap(
        backend.node_id, backend.name, backend.admin_address, backend.admin_port,
        _static_listener(backend.listener_name, listen, backend.listener_port, backend.local_cluster),
        _static_cluster(backend.local_cluster, [(LOOPBACK, backend.app_port)], health_check=None),
    )  # fmt: skip


def _static_bootstrap(
    node_id: str,
    node_cluster: str,
    admin_address: str,
    admin_port: int,
    listener: dict[str, Any],
    cluster: dict[str, Any],
) -> dict[str, Any]:
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }


def _static_listener(name: str, address: str, port: int, cluster: str) -> dict[str, Any]:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }


def _static_cluster(
    name: str, endpoints: Sequence[tuple[str, int]], *, health_check: dict[str, Any] | None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        # The same load-balancing settings healthplane gives its clusters (docs/design.md), so
        # that the comparison differs only in who health-checks.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}, "update_merge_window": "0s"},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
                        for a, p in endpoints
                    ]
                }
            ],
        },
    }
    if health_check is not None:
        cluster["health_checks"] = [health_check]
    return cluster


# ----------------------------------------------------------------------------- command line


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _subnet_arg(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IPv4 subnet: {exc}") from exc


def _add_common(parser: argparse.ArgumentParser, *, inherit: bool) -> None:
    # Under `lab scenario` / `lab compare` the defaults are SUPPRESSed so that an option given
    # before the sub-subcommand (`healthplane lab --netns scenario`) is not reset by them.
    def d(value: object) -> object:
        return argparse.SUPPRESS if inherit else value

    defaults = LabConfig()
    hc = defaults.health_check
    g = parser.add_argument_group("lab layout")
    g.add_argument(
        "--netns",
        action="store_true",
        default=d(False),
        help="each backend (demo app + sidecar) in its own network namespace, with its own "
        "address in --subnet (needs root and `ip netns`)",
    )
    g.add_argument(
        "--subnet",
        type=_subnet_arg,
        default=d(defaults.subnet),
        help=f"private subnet the lab creates for --netns (default {defaults.subnet})",
    )
    g.add_argument(
        "--netns-prefix",
        default=d(defaults.netns_prefix),
        help=f"prefix of the namespaces, bridge and veths --netns creates (default {defaults.netns_prefix})",
    )
    g.add_argument(
        "--delta",
        action="store_true",
        default=d(False),
        help="the Envoys use incremental xDS (api_type DELTA_GRPC) instead of state of the world",
    )
    g.add_argument(
        "--ports-base",
        type=int,
        default=d(None),
        metavar="N",
        help="host ports N..N+12 instead of the documented ones (docs/lab.md); 0: any free ports",
    )
    g.add_argument(
        "--workdir",
        type=Path,
        default=d(None),
        help="keep the topology, bootstraps and logs here (default: a temporary directory, removed)",
    )
    g.add_argument(
        "--envoy-log-level", default=d(defaults.envoy_log_level), choices=["trace", "debug", "info", "warning", "error"]
    )
    g.add_argument(
        "--grpc",
        action="store_true",
        default=d(False),
        help="also three gRPC demo servers (checked by the prober over grpc.health.v1) behind xds:///greeter, "
        "and a proxyless gRPC client printing which server answered",
    )
    g = parser.add_argument_group("health check of the backends (both modes)")
    g.add_argument("--interval", type=_duration_arg, default=d(hc.interval), help="default 1s")
    g.add_argument("--timeout", type=_duration_arg, default=d(None), help="default 500ms, at most --interval")
    g.add_argument("--healthy-threshold", type=int, default=d(hc.healthy_threshold), help="default 2")
    g.add_argument("--unhealthy-threshold", type=int, default=d(hc.unhealthy_threshold), help="default 2")


def _add_mode(parser: argparse.ArgumentParser, *, inherit: bool) -> None:
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=argparse.SUPPRESS if inherit else Mode.CENTRAL.value,
        help="central: healthplane's prober (default); per-envoy: every front proxy "
        "health-checks on its own (the classic static config)",
    )
    parser.add_argument(
        "--front-proxies",
        type=int,
        default=argparse.SUPPRESS if inherit else 1,
        metavar="N",
        help="number of front proxies sharing the listener (default 1)",
    )


def _add_traffic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument(
        "--fail", default=BACKENDS[0], choices=BACKENDS, help="the backend whose /livez fails (default %(default)s)"
    )
    parser.add_argument(
        "--slack",
        type=_duration_arg,
        default=1.0,
        help="added to the bounds derived from the health check (default 1s)",
    )


def add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `healthplane lab` and its `scenario` and `compare` sub-subcommands."""
    _add_common(parser, inherit=False)
    _add_mode(parser, inherit=False)
    sub = parser.add_subparsers(dest="lab_command", metavar="{scenario,compare}")
    s = sub.add_parser(
        "scenario",
        help="steady traffic, fail one backend's /livez, recover it; print the timeline; exit 0 if every step held",
    )
    _add_common(s, inherit=True)
    _add_mode(s, inherit=True)
    _add_traffic(s)
    s.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    c = sub.add_parser(
        "compare",
        help="the scenario with the central prober, then with per-Envoy health checks, side by side",
    )
    _add_common(c, inherit=True)
    _add_traffic(c)
    c.add_argument(
        "--fleets",
        type=int,
        nargs="+",
        default=[1, 10],
        metavar="N",
        help="numbers of front proxies to compare at (default: 1 10)",
    )
    c.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="K",
        help="scenario runs per fleet size and mode, on the same lab (default 3)",
    )
    c.add_argument("--markdown", type=Path, help="also write the table (Markdown) to this file")
    c.add_argument("--json", type=Path, help="also write every run's result as JSON to this file")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> LabConfig:
    """The LabConfig the parsed options describe (ConfigError names the bad option)."""
    hc = HealthCheckSpec()
    values: dict[str, Any] = {
        "mode": Mode(getattr(args, "mode", Mode.CENTRAL.value)),
        "netns": args.netns,
        "ports_base": args.ports_base,
        "health_check": HealthCheckSpec(
            interval=args.interval,
            timeout=args.timeout if args.timeout is not None else min(hc.timeout, args.interval),
            healthy_threshold=args.healthy_threshold,
            unhealthy_threshold=args.unhealthy_threshold,
        ),
        "front_proxies": getattr(args, "front_proxies", 1),
        "subnet": args.subnet,
        "netns_prefix": args.netns_prefix,
        "workdir": args.workdir,
        "envoy_log_level": args.envoy_log_level,
        "delta": getattr(args, "delta", False),
        "grpc": getattr(args, "grpc", False),
    }
    values.update(overrides)
    return LabConfig(**values)
