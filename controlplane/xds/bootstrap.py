"""Bootstraps that get everything over ADS from healthplane: Envoy's, and proxyless gRPC's."""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from controlplane.errors import ConfigError
from controlplane.topology.addresses import host_port, is_ip


@dataclass(frozen=True, slots=True)
class XdsTls:
    """TLS from Envoy to the control plane: trust `ca`; present `cert`/`key` for mutual TLS."""

    ca: str
    cert: str | None = None
    key: str | None = None
    sni: str | None = None  # also the SAN the control plane's certificate must carry

    def transport_socket(self) -> dict[str, Any]:
        validation: dict[str, Any] = {"trusted_ca": {"filename": self.ca}}
        if self.sni:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "IP_ADDRESS" if is_ip(self.sni) else "DNS", "matcher": {"exact": self.sni}}
            ]
        common: dict[str, Any] = {"validation_context": validation, "alpn_protocols": ["h2"]}
        if self.cert and self.key:
            common["tls_certificates"] = [
                {"certificate_chain": {"filename": self.cert}, "private_key": {"filename": self.key}}
            ]
        context: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common,
        }
        if self.sni and not is_ip(self.sni):
            context["sni"] = self.sni
        return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def xds_tls_from_args(args: argparse.Namespace) -> XdsTls | None:
    """The `bootstrap --tls-*` options; ConfigError when they do not make a whole."""
    if not (args.tls_ca or args.tls_cert or args.tls_key or args.tls_sni):
        return None
    if not args.tls_ca:
        raise ConfigError("TLS to the control plane needs the CA that signed its certificate", path="--tls-ca")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("a client certificate needs both --tls-cert and --tls-key", path="--tls-cert")
    return XdsTls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, sni=args.tls_sni)


# Envoy's own backoff for re-opening the ADS stream is 500 ms doubling up to 30 s (jittered). With
# several replicas a retry that picked the dead one costs one backoff, and after a whole control
# plane outage the next try can be 30 s away: start at 250 ms, cap at 5 s (docs/scaling.md, measured).
# One DNS name (a headless Service) is several replicas too: the STRICT_DNS cluster holds one
# endpoint per address it resolves to, so it gets the same backoff; one IP keeps Envoy's own.
ADS_RETRY_BACK_OFF = {"base_interval": "0.25s", "max_interval": "5s"}


def xds_servers(values: Sequence[str], flag: str = "--xds") -> list[tuple[str, int]]:
    """The control plane's xDS addresses from repeated `--xds HOST:PORT`; ConfigError naming the bad one."""
    if not values:
        raise ConfigError("at least one control plane address is required", path=flag)
    seen: dict[tuple[str, int], int] = {}
    out: list[tuple[str, int]] = []
    for i, text in enumerate(values):
        where = flag if len(values) == 1 else f"{flag}[{i}]"
        host, port = host_port(text, where)
        key = (host.lower(), port)
        if key in seen:
            raise ConfigError(f"{text} is given twice (also {flag}[{seen[key]}])", path=where)
        seen[key] = i
        out.append((host, port))
    return out


def make_bootstrap(
    *,
    node_id: str,
    service: str,
    xds_host: str = "",
    xds_port: int = 0,
    xds: Sequence[tuple[str, int]] = (),
    admin_port: int = 9901,
    admin_address: str = "127.0.0.1",
    zone: str = "",
    tls: XdsTls | None = None,
    delta: bool = False,
) -> dict[str, Any]:
    """A bootstrap whose listeners, routes, clusters and endpoints all come over ADS (over TLS if
    `tls`; incremental xDS, `DeltaAggregatedResources`, if `delta`).

    The control plane is `xds_host:xds_port`, or the replicas `xds` (HOST, PORT) pairs: all of them
    endpoints of the one `healthplane_xds` cluster, so a new ADS stream goes to a live one when its
    replica dies.
    """
    servers = list(xds) or [(xds_host, xds_port)]
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    envoy_grpc: dict[str, Any] = {"cluster_name": "healthplane_xds"}
    if len(servers) > 1 or not is_ip(servers[0][0]):
        envoy_grpc["retry_policy"] = {"retry_back_off": dict(ADS_RETRY_BACK_OFF)}
    node: dict[str, Any] = {"id": node_id, "cluster": service}
    if zone:
        node["locality"] = {"zone": zone}
    bootstrap: dict[str, Any] = {
        "node": node,
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": envoy_grpc}],
                # Without it Envoy resends its whole Node (tens of KB) with every ACK.
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "healthplane_xds",
                    # A hostname (docker-compose service name, a Kubernetes headless Service: one
                    # address per replica) needs DNS; IPs do not.
                    "type": "STATIC" if all(is_ip(host) for host, _ in servers) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {
                                "http2_protocol_options": {"connection_keepalive": {"interval": "30s", "timeout": "5s"}}
                            },
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "healthplane_xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                                    for host, port in servers
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }
    if tls is not None:
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = tls.transport_socket()
    return bootstrap


def bootstrap_yaml(bootstrap: dict[str, Any]) -> str:
    return yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False)


def make_grpc_bootstrap(
    *,
    node_id: str,
    xds_host: str = "",
    xds_port: int = 0,
    xds: Sequence[tuple[str, int]] = (),
    service: str = "",
    zone: str = "",
    tls: XdsTls | None = None,
    fallback: bool = False,
) -> dict[str, Any]:
    """The JSON a proxyless gRPC client reads from `GRPC_XDS_BOOTSTRAP` (gRFC A27; TLS: A65).

    Several replicas that are all IP addresses of one family become one `xds_servers` entry
    whose `server_uri` lists them (`ipv4:A:P,B:P`): gRPC's xDS channel then reconnects to a live
    one when its replica dies, as it does over a DNS name with several addresses. Otherwise (host
    names, mixed families, or `fallback`) each is its own entry, in order, and gRPC's fallback
    (gRFC A71) applies: a client that has its config stays with a dead first server (serving what
    it has, getting no health change) until it comes back or a resource is missing; see
    docs/scaling.md. gRPC's bootstrap has no SNI or SAN override: the control plane's certificate
    must match the host of `server_uri`.
    """
    if tls is not None and tls.sni:
        raise ConfigError(
            "gRPC's xDS bootstrap cannot override the name checked on the control plane's certificate; "
            "give that name as the host in --xds instead",
            path="--tls-sni",
        )
    creds: dict[str, Any] = {"type": "insecure"}
    if tls is not None:
        config = {"ca_certificate_file": tls.ca}
        if tls.cert and tls.key:
            config |= {"certificate_file": tls.cert, "private_key_file": tls.key}
        creds = {"type": "tls", "config": config}
    node: dict[str, Any] = {"id": node_id, "cluster": service}
    if zone:
        node["locality"] = {"zone": zone}
    servers = list(xds) or [(xds_host, xds_port)]
    uris = [f"{_uri_host(host)}:{port}" for host, port in servers]
    families = {_ip_family(host) for host, _ in servers}
    if len(servers) > 1 and not fallback and len(families) == 1 and None not in families:
        # gRPC's ipv4:/ipv6: resolvers take a comma-separated address list (gRPC's naming doc).
        uris = [f"{families.pop()}:{','.join(uris)}"]
    return {
        "xds_servers": [{"server_uri": uri, "channel_creds": [creds], "server_features": ["xds_v3"]} for uri in uris],
        "node": node,
    }


def _ip_family(host: str) -> str | None:
    try:
        return f"ipv{ipaddress.ip_address(host).version}"
    except ValueError:
        return None


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def grpc_bootstrap_json(bootstrap: dict[str, Any]) -> str:
    return json.dumps(bootstrap, indent=2) + "\n"
