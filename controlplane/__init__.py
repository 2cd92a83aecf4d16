"""healthplane's control plane: topology and verdicts in, versioned xDS snapshots out to every node.

The public names are below; each stage package (topology, health, snapshots, xds, observe,
probers, admin, cli) documents its own. Names load on first use, so that a prober importing the
topology model does not load the servers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controlplane.app import ControlPlane, HealthInput
    from controlplane.errors import ConfigError, HealthplaneError, ProtocolError
    from controlplane.health.store import HealthStatus, Verdict
    from controlplane.snapshots.snapshot import Cause, Snapshot
    from controlplane.topology.model import Topology
    from controlplane.topology.parse import load_topology, parse_topology, parse_topology_text

_HOMES = {
    "ControlPlane": "controlplane.app",
    "HealthInput": "controlplane.app",
    "ConfigError": "controlplane.errors",
    "HealthplaneError": "controlplane.errors",
    "ProtocolError": "controlplane.errors",
    "HealthStatus": "controlplane.health.store",
    "Verdict": "controlplane.health.store",
    "Cause": "controlplane.snapshots.snapshot",
    "Snapshot": "controlplane.snapshots.snapshot",
    "Topology": "controlplane.topology.model",
    "load_topology": "controlplane.topology.parse",
    "parse_topology": "controlplane.topology.parse",
    "parse_topology_text": "controlplane.topology.parse",
}

__all__ = [
    "Cause",
    "ConfigError",
    "ControlPlane",
    "HealthInput",
    "HealthStatus",
    "HealthplaneError",
    "ProtocolError",
    "Snapshot",
    "Topology",
    "Verdict",
    "load_topology",
    "parse_topology",
    "parse_topology_text",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'controlplane' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
