"""The topology: clusters, endpoints, listeners and health-check policy, read from YAML.

`load_topology(path)` and `parse_topology(document, source=...)` validate everything up front
and raise `ConfigError` naming the file, the field path (`clusters[1].endpoints[0].port`) and
what is wrong. The result is a tree of frozen dataclasses: it never changes once built.
The whole schema is documented in docs/config.md.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from controlplane.errors import ConfigError, ConfigErrors
from controlplane.topology.fields import Field
from controlplane.topology.model import (
    Cluster,
    ControlPlaneConfig,
    Endpoint,
    GrpcCheck,
    GrpcRoute,
    GrpcService,
    HealthCheck,
    HttpCheck,
    Listener,
    PassiveCheck,
    ProbersConfig,
    Route,
    SocketAddress,
    TcpCheck,
    Topology,
    WeightedCluster,
)
from controlplane.topology.propagation import parse_propagation
from controlplane.topology.security import (
    ADMIN_KEYS,
    XDS_KEYS,
    parse_security,
    parse_token,
)
from controlplane.topology.store import parse_store
from controlplane.topology.yamldoc import MAX_DEPTH, MAX_INT_DIGITS, load_document

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_HEADER = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# What HTTP/1.1 lets through unencoded (RFC 9112/9110); anything else would split or smuggle a
# request on the wire: a request-target is visible ASCII, no space; a Host (and SNI) is a
# reg-name, IP literal and port; a header value is visible ASCII with inner spaces and tabs.
_TARGET = re.compile(r"/[\x21-\x7e]*")
_HOST = re.compile(r"[A-Za-z0-9.\-_~!$&'()*+,;=%:\[\]]+")
_FIELD_VALUE = re.compile(r"[\x21-\x7e]([\x20\x09\x21-\x7e]*[\x21-\x7e])?|")


def _http_text(f: Field, value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        bad = next((c for c in value if not pattern.fullmatch(c) and not c.isalnum()), None) or next(
            (c for c in value if ord(c) > 0x7E or ord(c) < 0x21), value[:1]
        )
        raise f.error(f"{what} cannot contain {bad!r} (control characters, spaces and non-ASCII are refused)")
    return value


def _ip(f: Field, *, allow_hostname: bool) -> str:
    text = f.string()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        if allow_hostname and re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9\-.]{0,252})", text):
            return text
        raise f.error(f"{text!r} is not an IP address" + ("" if not allow_hostname else " or hostname")) from None


# --------------------------------------------------------------------------- sections

_HC_COMMON = {
    "port", "interval", "timeout", "initial_jitter", "interval_jitter", "unhealthy_interval",
    "healthy_edge_interval", "unhealthy_edge_interval", "healthy_threshold", "unhealthy_threshold",
    "http_failures", "tcp_failures", "timeouts", "initial_status",
}  # fmt: skip
_HC_KINDS = {"http", "tcp", "grpc"}


def _socket(f: Field, default: SocketAddress, extra: frozenset[str] = frozenset()) -> SocketAddress:
    if f.missing:
        return default
    f.mapping({"address", "port"} | extra)
    return SocketAddress(
        address=_ip(f.child("address"), allow_hostname=True) if not f.child("address").missing else default.address,
        port=f.child("port").integer(default=default.port, lo=0, hi=65535),
    )


def _controlplane(f: Field) -> ControlPlaneConfig:
    if f.missing:
        return ControlPlaneConfig()
    f.mapping({"xds", "admin", "watch_interval", "propagation", "store"} | _FAULT_KEYS)
    d = ControlPlaneConfig()
    return ControlPlaneConfig(
        xds=_socket(f.child("xds"), d.xds, XDS_KEYS),
        admin=_socket(f.child("admin"), d.admin, frozenset({"token"}) | ADMIN_KEYS),
        watch_interval=f.child("watch_interval").duration(default=d.watch_interval),
        admin_token=None if f.child("admin").missing else parse_token(f.child("admin").child("token")),
        **_faults(f, d),
        security=parse_security(f),
        propagation=parse_propagation(f.child("propagation").value, path=f.child("propagation").path, source=f.source),
        store=parse_store(f.child("store")),
    )


_FAULT_KEYS = {"data_dir", "prober_staleness", "mass_failure", "stuck_stream_timeout"}


def _faults(f: Field, d: ControlPlaneConfig) -> dict[str, Any]:
    """issue 7a: `data_dir`, `prober_staleness`, `mass_failure: {share, window, min_endpoints}`,
    `stuck_stream_timeout`."""
    out: dict[str, Any] = {
        "data_dir": None if f.child("data_dir").missing else f.child("data_dir").string(),
        "prober_staleness": f.child("prober_staleness").duration(default=d.prober_staleness),
        "stuck_stream_timeout": f.child("stuck_stream_timeout").duration(default=d.stuck_stream_timeout),
    }
    mf = f.child("mass_failure")
    if not mf.missing:
        mf.mapping({"share", "window", "min_endpoints"})
        out["mass_failure_share"] = mf.child("share").number(default=d.mass_failure_share, lo=0.0, hi=1.0)
        out["mass_failure_window"] = mf.child("window").duration(default=d.mass_failure_window, positive=True)
        out["mass_failure_min"] = mf.child("min_endpoints").integer(default=d.mass_failure_min, lo=1)
    return out


def _statuses(f: Field) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for item in f.items():
        if isinstance(item.value, int) and not isinstance(item.value, bool):
            code = item.integer(lo=100, hi=599)
            ranges.append((code, code))
            continue
        if not isinstance(item.value, list) or len(item.value) != 2:
            raise item.error("must be a status code or a [first, last] range such as [200, 399]")
        lo = item.child(0).integer(lo=100, hi=599)
        hi = item.child(1).integer(lo=100, hi=599)
        if lo > hi:
            raise item.error(f"range [{lo}, {hi}] is empty: first must be <= last")
        ranges.append((lo, hi))
    if not ranges:
        raise f.error("must list at least one status or range")
    return tuple(ranges)


def _payload(f: Field) -> bytes | None:
    """A TCP payload: a string (sent as UTF-8) or {hex: "..."}/{text: "..."}."""
    if f.missing:
        return None
    if isinstance(f.value, str):
        return f.value.encode()
    f.mapping({"hex", "text"})
    if not f.child("hex").missing:
        try:
            return bytes.fromhex(f.child("hex").string())
        except ValueError:
            raise f.child("hex").error("is not valid hex") from None
    return f.child("text").string().encode()


def _http(f: Field) -> HttpCheck:
    if f.value is None or f.value == {}:
        return HttpCheck()
    f.mapping({
        "path", "method", "host", "headers", "body", "expected_statuses", "expected_body", "https",
        "sni", "verify_tls", "keepalive", "keepalive_requests",
    })  # fmt: skip
    headers: list[tuple[str, str]] = []
    hf = f.child("headers")
    if not hf.missing:
        if not isinstance(hf.value, dict):
            raise hf.error("must be a mapping of header name to value")
        for name in hf.value:
            value = hf.child(name).string()
            if not isinstance(name, str) or not _HEADER.fullmatch(name):
                raise hf.error(f"{name!r} is not a valid header name")
            if any(c in value for c in "\r\n\0"):
                raise hf.child(name).error("header values cannot contain CR, LF or NUL")
            _http_text(hf.child(name), value, _FIELD_VALUE, "a header value")
            headers.append((name, value))
    path = f.child("path").string(default="/")
    if not path.startswith("/"):
        raise f.child("path").error("must start with /")
    _http_text(f.child("path"), path, _TARGET, "a request path (percent-encode it)")
    host = f.child("host").opt_str()
    if host is not None:
        _http_text(f.child("host"), host, _HOST, "a Host")
    sni = f.child("sni").opt_str()
    if sni is not None:
        _http_text(f.child("sni"), sni, _HOST, "an SNI name")
    method = f.child("method").string(default="GET").upper()
    if method not in {"GET", "HEAD", "POST", "PUT", "OPTIONS", "PATCH", "DELETE"}:
        raise f.child("method").error(f"{method!r} is not a supported HTTP method")
    sf = f.child("expected_statuses")
    return HttpCheck(
        path=path,
        method=method,
        host=host,
        headers=tuple(headers),
        body=f.child("body").opt_str(),
        expected_statuses=((200, 399),) if sf.missing else _statuses(sf),
        expected_body=f.child("expected_body").opt_str(),
        https=f.child("https").boolean(default=False),
        sni=sni,
        verify_tls=f.child("verify_tls").boolean(default=True),
        keepalive=f.child("keepalive").boolean(default=True),
        keepalive_requests=f.child("keepalive_requests").integer(default=0, lo=0),
    )


def _grpc(f: Field) -> GrpcCheck:
    if isinstance(f.value, dict) and "verify_tls" in f.value:
        # grpc's channel credentials always verify; there is no switch to turn that off.
        raise f.child("verify_tls").error("is not supported for gRPC checks: give ca_file with the endpoint's CA")
    f.mapping({"service", "authority", "tls", "ca_file", "cert_file", "key_file", "sni"})
    tls = f.child("tls").boolean(default=False)
    files = {name: f.child(name).opt_str() for name in ("ca_file", "cert_file", "key_file")}
    sni = f.child("sni").opt_str()
    if not tls:
        for name, value in (*files.items(), ("sni", sni)):
            if value is not None:
                raise f.child(name).error("needs tls: true")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        missing = "key_file" if files["key_file"] is None else "cert_file"
        raise f.child(missing).error("is required with " + ("cert_file" if missing == "key_file" else "key_file"))
    return GrpcCheck(
        service=f.child("service").string(default=""),
        authority=f.child("authority").opt_str(),
        tls=tls,
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        sni=sni,
    )


def _health_check(f: Field, base: HealthCheck | None) -> HealthCheck | None:
    """A health_check section; with `base`, a partial override of it (per endpoint)."""
    if f.missing:
        return base
    f.mapping(_HC_COMMON | _HC_KINDS)
    kinds = [k for k in ("http", "tcp", "grpc") if k in f.value]
    if len(kinds) > 1:
        raise f.error(f"give one check kind, not {' and '.join(kinds)}")
    if not kinds and base is None:
        raise f.error("needs one check kind: http, tcp or grpc")
    hc = base or HealthCheck(kind="http")
    if kinds:
        kind = kinds[0]
        kf = f.child(kind)
        if kind == "http":
            hc = replace(hc, kind="http", http=_http(kf), tcp=None, grpc=None)
        elif kind == "tcp":
            if kf.value not in (None, {}):
                kf.mapping({"send", "receive"})
            tcp = (
                TcpCheck()
                if kf.value in (None, {})
                else TcpCheck(send=_payload(kf.child("send")), receive=_payload(kf.child("receive")))
            )
            hc = replace(hc, kind="tcp", tcp=tcp, http=None, grpc=None)
        else:
            grpc = GrpcCheck() if kf.value in (None, {}) else _grpc(kf)
            hc = replace(hc, kind="grpc", grpc=grpc, http=None, tcp=None)
    updates: dict[str, Any] = {}
    for name in ("interval", "timeout"):
        if not f.child(name).missing:
            updates[name] = f.child(name).duration(positive=True)
    if not f.child("initial_jitter").missing:
        updates["initial_jitter"] = f.child("initial_jitter").duration()
    if not f.child("interval_jitter").missing:
        updates["interval_jitter_percent"] = f.child("interval_jitter").number(default=0, lo=0, hi=100)
    for name in ("unhealthy_interval", "healthy_edge_interval", "unhealthy_edge_interval"):
        if not f.child(name).missing:
            updates[name] = f.child(name).duration(positive=True)
    for name in ("healthy_threshold", "unhealthy_threshold", "http_failures", "tcp_failures", "timeouts"):
        if not f.child(name).missing:
            updates[name] = f.child(name).integer(lo=1, hi=1000)
    if not f.child("port").missing:
        updates["port"] = f.child("port").integer(lo=1, hi=65535)
    if not f.child("initial_status").missing:
        status = f.child("initial_status").string()
        if status not in ("unknown", "healthy", "unhealthy"):
            raise f.child("initial_status").error("must be unknown, healthy or unhealthy")
        updates["initial_status"] = status
    hc = replace(hc, **updates)
    if hc.timeout > hc.interval and "timeout" in updates:
        raise f.child("timeout").error(
            f"must not exceed the interval ({hc.interval:g}s): a check would still run when the next starts"
        )
    if hc.timeout > hc.interval and "interval" in updates:
        raise f.child("interval").error(
            f"must not be shorter than the timeout ({hc.timeout:g}s): a check would still run when the next starts"
        )
    return hc


def _endpoint(f: Field, cluster_hc: HealthCheck | None) -> Endpoint:
    f.mapping({"address", "port", "zone", "region", "sub_zone", "weight", "hostname", "health_check"})
    hcf = f.child("health_check")
    if not hcf.missing and cluster_hc is None and isinstance(hcf.value, dict) and not (set(hcf.value) & _HC_KINDS):
        raise hcf.error("overrides a cluster health_check, but the cluster has none")
    return Endpoint(
        address=_ip(f.child("address"), allow_hostname=False),
        port=f.child("port").integer(lo=1, hi=65535),
        zone=f.child("zone").string(default=""),
        region=f.child("region").string(default=""),
        sub_zone=f.child("sub_zone").string(default=""),
        weight=f.child("weight").integer(default=1, lo=1, hi=128),
        hostname=f.child("hostname").string(default=""),
        health_check=_health_check(hcf, cluster_hc),
    )


# Cluster fields the topology owns: a fragment overriding them would make Envoy's cluster differ
# from the one the snapshot claims (another name, a static type, endpoints outside EDS).
_OWNED_CLUSTER_FIELDS = frozenset(
    {
        "name",
        "type",
        "cluster_type",
        "clusterType",
        "eds_cluster_config",
        "edsClusterConfig",
        "load_assignment",
        "loadAssignment",
    }
)


def _envoy_fragment(f: Field, message_cls: Any) -> dict[str, Any]:
    if f.missing:
        return {}
    if not isinstance(f.value, dict):
        raise f.error("must be a mapping of Envoy fields (proto3 JSON names)")
    for key in f.value:
        if key in _OWNED_CLUSTER_FIELDS:
            raise f.child(key).error(
                "is set by healthplane from the topology (name, type and endpoints come over EDS); "
                "change the topology instead"
            )
    try:
        json_format.ParseDict(json.loads(json.dumps(f.value)), message_cls())
    # Not only ParseError: json_format raises AttributeError/KeyError on a malformed Any or Struct.
    except Exception as exc:
        raise f.error(f"not a valid {message_cls.DESCRIPTOR.full_name} fragment: {exc}") from None
    copy: dict[str, Any] = json.loads(json.dumps(f.value))  # deep and plain: nothing shared stays mutable
    return copy


def _cluster(f: Field) -> Cluster:
    from envoy.config.cluster.v3 import cluster_pb2

    f.mapping({
        "name", "endpoints", "health_check", "connect_timeout", "lb_policy", "healthy_panic_threshold",
        "update_merge_window", "envoy", "passive",
    })  # fmt: skip
    name = f.child("name").string(pattern=_NAME)
    hc = _health_check(f.child("health_check"), None)
    endpoints: list[Endpoint] = []
    seen: dict[str, int] = {}
    ef = f.child("endpoints")
    if not ef.missing:
        for i, item in enumerate(ef.items()):
            ep = _endpoint(item, hc)
            if ep.key in seen:
                raise item.error(f"duplicate endpoint {ep.key} (also at endpoints[{seen[ep.key]}])")
            seen[ep.key] = i
            endpoints.append(ep)
    lb = f.child("lb_policy").string(default="ROUND_ROBIN").upper()
    if lb not in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV"):
        raise f.child("lb_policy").error(f"{lb!r} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV")
    return Cluster(
        name=name,
        endpoints=tuple(endpoints),
        health_check=hc,
        connect_timeout=f.child("connect_timeout").duration(default=1.0, positive=True),
        lb_policy=lb,  # type: ignore[arg-type]
        healthy_panic_threshold=f.child("healthy_panic_threshold").number(default=0.0, lo=0, hi=100),
        update_merge_window=f.child("update_merge_window").duration(default=0.0),
        envoy=_envoy_fragment(f.child("envoy"), cluster_pb2.Cluster),
        passive=_passive(f.child("passive")),
    )


def _status_list(f: Field, default: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """APISIX's `http_statuses`: a list of codes (ranges such as [500, 504] allowed too)."""
    return default if f.missing else _statuses(f)


def _empty(f: Field) -> Field:
    return Field({}, f.path, f.source)


def _passive(f: Field) -> PassiveCheck | None:
    """issue 15: `passive: {unhealthy: {...}, healthy: {...}, eject_for, max_eject_for}`."""
    if f.missing:
        return None
    if f.value == {}:
        return PassiveCheck()
    f.mapping({"unhealthy", "healthy", "eject_for", "max_eject_for"})
    d = PassiveCheck()
    uf, hf = f.child("unhealthy"), f.child("healthy")
    # An absent section reads as an empty one: its fields keep their defaults, errors their paths.
    u = uf.mapping({"http_statuses", "http_failures", "tcp_failures", "timeouts"}) if not uf.missing else _empty(uf)
    h = hf.mapping({"http_statuses", "successes"}) if not hf.missing else _empty(hf)
    passive = PassiveCheck(
        unhealthy_statuses=_status_list(u.child("http_statuses"), d.unhealthy_statuses),
        http_failures=u.child("http_failures").integer(default=d.http_failures, lo=0, hi=1000),
        tcp_failures=u.child("tcp_failures").integer(default=d.tcp_failures, lo=0, hi=1000),
        timeouts=u.child("timeouts").integer(default=d.timeouts, lo=0, hi=1000),
        healthy_statuses=_status_list(h.child("http_statuses"), d.healthy_statuses),
        successes=h.child("successes").integer(default=d.successes, lo=1, hi=1000),
        eject_for=f.child("eject_for").duration(default=d.eject_for, positive=True),
        max_eject_for=f.child("max_eject_for").duration(default=max(d.max_eject_for, d.eject_for), positive=True),
    )
    if not (passive.http_failures or passive.tcp_failures or passive.timeouts):
        raise u.error("turns every failure kind off (http_failures, tcp_failures and timeouts all 0)")
    for lo, hi in passive.unhealthy_statuses:
        for hlo, hhi in passive.healthy_statuses:
            if lo <= hhi and hlo <= hi:
                code = max(lo, hlo)
                where = u.child("http_statuses") if not u.child("http_statuses").missing else h.child("http_statuses")
                raise where.error(f"status {code} is both healthy and unhealthy")
    if passive.max_eject_for < passive.eject_for:
        if f.child("max_eject_for").missing:
            passive = replace(passive, max_eject_for=passive.eject_for)
        else:
            raise f.child("max_eject_for").error(f"must not be shorter than eject_for ({passive.eject_for:g}s)")
    return passive


def _route(f: Field, clusters: set[str]) -> Route:
    f.mapping({"prefix", "path", "cluster", "timeout", "prefix_rewrite"})
    if not f.child("prefix").missing and not f.child("path").missing:
        raise f.error("give prefix or path, not both")
    cluster = f.child("cluster").string()
    if cluster not in clusters:
        raise f.child("cluster").error(f"no cluster named {cluster!r}")
    path = f.child("path").opt_str()
    prefix = None if path is not None else f.child("prefix").string(default="/")
    for key, value in (("path", path), ("prefix", prefix)):
        if value is not None and not value.startswith("/"):
            raise f.child(key).error("must start with /")
    return Route(
        cluster=cluster,
        prefix=prefix,
        path=path,
        timeout=f.child("timeout").opt_duration(positive=False),
        prefix_rewrite=f.child("prefix_rewrite").opt_str(),
    )


def _listener(f: Field, clusters: set[str]) -> Listener:
    f.mapping({"name", "address", "port", "routes", "domains", "nodes"})
    routes = tuple(_route(r, clusters) for r in f.child("routes").items())
    if not routes:
        raise f.child("routes").error("must have at least one route")
    nodes_f = f.child("nodes")
    nodes = None if nodes_f.missing else tuple(n.string() for n in nodes_f.items())
    domains_f = f.child("domains")
    domains = ("*",) if domains_f.missing else tuple(d.string() for d in domains_f.items())
    if not domains:
        raise domains_f.error('must have at least one domain (use "*" for any)')
    return Listener(
        name=f.child("name").string(pattern=_NAME),
        address=_ip(f.child("address"), allow_hostname=False) if not f.child("address").missing else "0.0.0.0",
        port=f.child("port").integer(lo=1, hi=65535),
        routes=routes,
        domains=domains,
        nodes=nodes,
    )


def _check_shape(document: Any, source: str) -> None:
    """Depth and integer size of a plain document (from JSON, say), checked without recursion."""
    stack: list[tuple[Any, str, int]] = [(document, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"nested deeper than {MAX_DEPTH} levels", path=path, source=source)
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_DIGITS * 3.33:
            raise ConfigError(f"integer of more than {MAX_INT_DIGITS} digits is too long", path=path, source=source)
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


_PROTO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_METHOD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _weighted_clusters(f: Field, clusters: set[str]) -> tuple[WeightedCluster, ...]:
    out: list[WeightedCluster] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(f.items()):
        item.mapping({"cluster", "weight"})
        name = item.child("cluster").string()
        if name not in clusters:
            raise item.child("cluster").error(f"no cluster named {name!r}")
        if name in seen:
            raise item.child("cluster").error(f"{name!r} is listed twice (also weighted_clusters[{seen[name]}])")
        seen[name] = i
        # gRPC rejects a route whose weights sum to 0 or past 2^32-1; 1..10000 each keeps well inside.
        out.append(WeightedCluster(name, item.child("weight").integer(lo=1, hi=10_000)))
    if not out:
        raise f.error("must list at least one {cluster, weight}")
    return tuple(out)


def _grpc_route(f: Field, clusters: set[str]) -> GrpcRoute:
    f.mapping({"service", "method", "cluster", "weighted_clusters", "timeout"})
    has_cluster, has_weighted = not f.child("cluster").missing, not f.child("weighted_clusters").missing
    if has_cluster == has_weighted:
        raise f.error("give cluster or weighted_clusters" + (", not both" if has_cluster else ""))
    if has_cluster:
        name = f.child("cluster").string()
        if name not in clusters:
            raise f.child("cluster").error(f"no cluster named {name!r}")
        targets: tuple[WeightedCluster, ...] = (WeightedCluster(name, 1),)
    else:
        targets = _weighted_clusters(f.child("weighted_clusters"), clusters)
    service = None if f.child("service").missing else f.child("service").string(pattern=_PROTO_NAME)
    method = None if f.child("method").missing else f.child("method").string(pattern=_METHOD)
    if method is not None and service is None:
        raise f.child("method").error("needs service (the full name, such as helloworld.Greeter)")
    return GrpcRoute(
        clusters=targets,
        service=service,
        method=method,
        timeout=f.child("timeout").opt_duration(positive=True),
    )


def _grpc_service(f: Field, clusters: set[str]) -> GrpcService:
    f.mapping({"name", "cluster", "routes"})
    name = f.child("name").string(pattern=_NAME)
    has_cluster, has_routes = not f.child("cluster").missing, not f.child("routes").missing
    if has_cluster == has_routes:
        raise f.error("give cluster (every call to one cluster) or routes" + (", not both" if has_cluster else ""))
    if has_cluster:
        return GrpcService(name, (_grpc_route(Field({"cluster": f.value["cluster"]}, f.path, f.source), clusters),))
    routes: list[GrpcRoute] = []
    for item in f.child("routes").items():
        route = _grpc_route(item, clusters)
        for j, earlier in enumerate(routes):
            # gRPC takes the first matching route: one that an earlier route shadows is a mistake.
            if earlier.service is None or (earlier.method is None and earlier.service == route.service):
                raise item.error(f"is never used: routes[{j}] already matches every call it would")
            if earlier.path is not None and earlier.path == route.path:
                raise item.error(f"is never used: routes[{j}] matches the same method")
        routes.append(route)
    if not routes:
        raise f.child("routes").error("must have at least one route")
    return GrpcService(name, tuple(routes))


# What grpcio's xDS client accepts in Cluster.lb_policy (it NACKs the rest: "LB policy is not
# supported"); measured against grpcio 1.85, see docs/design.md.
GRPC_LB_POLICIES = frozenset({"ROUND_ROBIN", "RING_HASH"})


def _grpc_services(f: Field, clusters: dict[str, Cluster], listeners: dict[str, int]) -> tuple[GrpcService, ...]:
    if f.missing:
        return ()
    out: list[GrpcService] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(f.items()):
        service = _grpc_service(item, set(clusters))
        for r, route in enumerate(service.routes):
            for target in route.clusters:
                policy = clusters[target.cluster].lb_policy
                if policy not in GRPC_LB_POLICIES:
                    shorthand = not item.child("cluster").missing
                    where = item.child("cluster") if shorthand else item.child("routes").child(r)
                    raise where.error(
                        f"cluster {target.cluster!r} has lb_policy {policy}, which gRPC's xDS client rejects "
                        f"(it takes {' or '.join(sorted(GRPC_LB_POLICIES))})"
                    )
        if service.name in seen:
            raise item.child("name").error(
                f"duplicate gRPC service name {service.name!r} (also grpc_services[{seen[service.name]}])"
            )
        if service.name in listeners:
            # One LDS and RDS namespace: an API listener and an Envoy listener cannot share a name.
            raise item.child("name").error(
                f"{service.name!r} is also the name of listeners[{listeners[service.name]}]; "
                "listener and gRPC service names share one namespace"
            )
        seen[service.name] = i
        out.append(service)
    return tuple(out)


# More owners per endpoint than this is a typo, not a plan: every owner checks the endpoint.
MAX_PROBER_REPLICAS = 16


def _probers(f: Field) -> ProbersConfig:
    """issue 17: `probers: {replicas: R}`, how many of the remote probers check each endpoint."""
    if f.missing:
        return ProbersConfig()
    f.mapping({"replicas"})
    return ProbersConfig(replicas=f.child("replicas").integer(default=1, lo=1, hi=MAX_PROBER_REPLICAS))


def parse_topology(document: Any, *, source: str = "") -> Topology:
    """Validate a topology document (already parsed from YAML or JSON).

    Every cluster, listener and the controlplane section are checked even after one fails: a
    document with several errors raises `ConfigErrors` listing each (one per cluster, listener
    or section, the first found in each), not only the first.
    """
    _check_shape(document, source)
    root = Field(document if document is not None else {}, "", source)
    root.mapping(
        {"controlplane", "clusters", "listeners"},
        also={"grpc_services": "for proxyless gRPC clients", "probers": "how remote probers share the endpoints"},
    )
    errors: list[ConfigError] = []
    clusters: list[Cluster] = []
    names: dict[str, int] = {}
    cf = root.child("clusters")
    if not cf.missing:
        for i, item in enumerate(cf.items()):
            try:
                cluster = _cluster(item)
            except ConfigError as exc:
                errors.append(exc)
                name = item.value.get("name") if isinstance(item.value, dict) else None
                if isinstance(name, str):
                    names.setdefault(name, i)  # listeners routing to it are not also wrong
                continue
            if cluster.name in names:
                errors.append(
                    item.child("name").error(
                        f"duplicate cluster name {cluster.name!r} (also clusters[{names[cluster.name]}])"
                    )
                )
                continue
            names[cluster.name] = i
            clusters.append(cluster)
    listeners: list[Listener] = []
    lnames: dict[str, int] = {}
    lf = root.child("listeners")
    if not lf.missing:
        for i, item in enumerate(lf.items()):
            try:
                listener = _listener(item, set(names))
                if listener.name in lnames:
                    raise item.child("name").error(
                        f"duplicate listener name {listener.name!r} (also listeners[{lnames[listener.name]}])"
                    )
                for j, other in enumerate(listeners):
                    shared = other.nodes is None or listener.nodes is None or set(other.nodes) & set(listener.nodes)
                    if shared and (other.address, other.port) == (listener.address, listener.port):
                        raise item.child("port").error(
                            f"{listener.address}:{listener.port} is already used by listeners[{j}] "
                            f"({other.name}) on the same nodes"
                        )
            except ConfigError as exc:
                errors.append(exc)
                continue
            lnames[listener.name] = i
            listeners.append(listener)
    try:
        controlplane = _controlplane(root.child("controlplane"))
    except ConfigError as exc:
        errors.append(exc)
    try:
        probers = _probers(root.child("probers"))
    except ConfigError as exc:
        errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
    return Topology(
        controlplane=controlplane,
        clusters=tuple(clusters),
        listeners=tuple(listeners),
        grpc_services=_grpc_services(root.child("grpc_services"), {c.name: c for c in clusters}, lnames),
        probers=probers,
        source=source,
        document=json.loads(json.dumps(document if document is not None else {})),
    )


def parse_topology_text(text: str, *, source: str = "") -> Topology:
    """Parse YAML (or JSON, which is YAML) text into a validated Topology."""
    return parse_topology(load_document(text, source=source), source=source)


def load_topology(path: str | Path) -> Topology:
    """Read and validate the topology file at `path`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", source=str(p)) from None
    return parse_topology_text(text, source=str(p))
