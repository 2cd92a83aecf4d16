"""The fleet's part of a topology document, and a replica's own part: split one, merge the two.

What every replica serves alike lives in etcd: `clusters`, `listeners`, `grpc_services`,
`probers` (how probers share the endpoints) and the health settings of the `controlplane`
section (`prober_staleness`, `mass_failure`, `stuck_stream_timeout`, `propagation`). What
belongs to one replica stays in its local file: `controlplane.xds` and `controlplane.admin`
(addresses, ports, TLS files, tokens, limits), `watch_interval`, `data_dir` and `store` itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from controlplane.errors import ConfigError
from controlplane.topology.model import Topology, keep_running_settings
from controlplane.topology.parse import parse_topology

FLEET_KEYS = ("clusters", "listeners", "grpc_services", "probers")
FLEET_CONTROLPLANE_KEYS = ("prober_staleness", "mass_failure", "stuck_stream_timeout", "propagation")


def fleet_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """The fleet's part of a whole (validated) topology document, as plain JSON types."""
    out: dict[str, Any] = {k: document[k] for k in FLEET_KEYS if k in document}
    cp = document.get("controlplane") or {}
    shared = {k: cp[k] for k in FLEET_CONTROLPLANE_KEYS if k in cp}
    if shared:
        out["controlplane"] = shared
    copy: dict[str, Any] = json.loads(json.dumps(out))
    return copy


def local_settings(document: Mapping[str, Any]) -> dict[str, Any]:
    """A replica's own part: its `controlplane` section without the fleet's keys."""
    cp = document.get("controlplane") or {}
    return {k: v for k, v in cp.items() if k not in FLEET_CONTROLPLANE_KEYS}


def ignored_local_keys(document: Mapping[str, Any]) -> list[str]:
    """The field paths of a pushed document that stay local to each replica (not written to etcd)."""
    cp = document.get("controlplane") or {}
    return [f"controlplane.{k}" for k in cp if k not in FLEET_CONTROLPLANE_KEYS]


def merge(fleet: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
    """One whole document: the fleet's part with a replica's own `controlplane` settings."""
    out: dict[str, Any] = {k: v for k, v in fleet.items() if k != "controlplane"}
    shared = fleet.get("controlplane") or {}
    out["controlplane"] = {**local, **{k: v for k, v in shared.items() if k in FLEET_CONTROLPLANE_KEYS}}
    return out


def fleet_topology(fleet: Mapping[str, Any], running: Topology, *, source: str) -> Topology:
    """The topology a replica serves for `fleet`: merged with its running local settings and
    validated (ConfigError naming `source` and the field)."""
    try:
        # Parsed as from the local file, so that its relative file paths (TLS, password_file)
        # resolve as they did at start; an error names where the fleet part came from.
        topology = parse_topology(merge(fleet, local_settings(running.document)), source=running.source)
    except ConfigError as exc:
        raise ConfigError(exc.message, path=exc.path, source=source) from None
    return replace(topology, controlplane=keep_running_settings(running.controlplane, topology.controlplane))


def with_local_settings(running: Topology, local_file: Topology) -> Topology:
    """The running fleet's part with the own settings of a (re-read, validated) local file."""
    merged = merge(fleet_document(running.document), local_settings(local_file.document))
    return parse_topology(merged, source=local_file.source)
