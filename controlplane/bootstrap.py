"""Envoy bootstraps that get everything over ADS from healthplane."""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_bootstrap(
    *,
    node_id: str,
    service: str,
    xds_host: str,
    xds_port: int,
    admin_port: int = 9901,
    admin_address: str = "127.0.0.1",
    zone: str = "",
) -> dict[str, Any]:
    """A bootstrap whose listeners, routes, clusters and endpoints all come over ADS."""
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    node: dict[str, Any] = {"id": node_id, "cluster": service}
    if zone:
        node["locality"] = {"zone": zone}
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "healthplane_xds"}}],
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
                    # A hostname (docker-compose service name) needs DNS; an IP does not.
                    "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
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
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": xds_host,
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


def bootstrap_yaml(bootstrap: dict[str, Any]) -> str:
    return yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False)
