"""`healthplane topology push FILE`: validate a topology and write its fleet's part to etcd (issue 17).

Every replica sharing the store applies it from its watch; each keeps its own settings (ports,
TLS, data_dir) from its local file. The etcd settings come from `--config` (a replica's local
file) or, without it, from FILE's own `controlplane.store`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
from typing import Any

from controlplane.errors import ConfigError


def _push(args: argparse.Namespace) -> int:
    from controlplane.store.etcd import push_topology
    from controlplane.store.fleet import ignored_local_keys
    from controlplane.topology.parse import load_topology

    topology = load_topology(args.file)  # a bad file stops here, with its field, and reaches no etcd
    config = load_topology(args.config) if args.config else topology
    store = config.controlplane.store
    if store is None:
        where = args.config or args.file
        raise ConfigError(
            f"{where} has no controlplane.store: give --config with a replica's local file", path="--config"
        )
    who = f"{getpass.getuser()}@{socket.gethostname()} (healthplane topology push)"
    revision = asyncio.run(push_topology(store.etcd, topology, who=who, detail=f"pushed {args.file} by {who}"))
    endpoints = sum(len(c.endpoints) for c in topology.clusters)
    local = ignored_local_keys(topology.document)
    print(
        f"{args.file}: pushed to etcd {store.etcd.prefix} at revision {revision} "
        f"({len(topology.clusters)} clusters, {endpoints} endpoints, {len(topology.listeners)} listeners)"
        + (f"; kept local to each replica, not pushed: {', '.join(local)}" if local else "")
    )
    return 0


def add_topology_commands(sub: Any) -> None:
    """`healthplane topology push FILE [--config LOCAL]`."""
    p = sub.add_parser("topology", help="the fleet's topology in the shared store (etcd)")
    topo = p.add_subparsers(dest="topology_command", required=True)
    push = topo.add_parser("push", help="validate FILE and write its fleet's part to etcd for every replica")
    push.add_argument("file", help="topology YAML file")
    push.add_argument("--config", "-c", help="a replica's local file, for controlplane.store (default: FILE's own)")
    push.set_defaults(func=_push)
