"""Which of a prober's processes checks an endpoint (pure).

`healthplane prober --processes N` splits one prober's endpoints between N processes so that a
host's cores check together. Each endpoint goes to one shard by rendezvous (highest random
weight) hashing of its `address:port`:

- every process computes the same owner from the same N, with no coordination;
- an endpoint that appears in several clusters lands in one process, which keeps one pooled
  connection for it, as a single process does;
- going from N to N+1 processes moves only about 1/(N+1) of the endpoints.

The hash is BLAKE2b, not `hash()`, which is salted per process.
"""

from __future__ import annotations

import dataclasses
import hashlib

from controlplane.topology.model import Topology

__all__ = ["shard_of", "shard_topology"]


def _weight(shard: int, key: str) -> int:
    digest = hashlib.blake2b(f"{shard}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_of(endpoint: str, shards: int) -> int:
    """The shard (0..shards-1) that checks `endpoint` (`address:port`)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards == 1:
        return 0
    return max(range(shards), key=lambda shard: _weight(shard, endpoint))


def shard_topology(topology: Topology, shard: int, shards: int) -> Topology:
    """`topology` with only the endpoints that `shard` of `shards` checks (clusters left empty stay)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    if shards == 1:
        return topology
    clusters = tuple(
        dataclasses.replace(
            cluster, endpoints=tuple(ep for ep in cluster.endpoints if shard_of(ep.key, shards) == shard)
        )
        for cluster in topology.clusters
    )
    return dataclasses.replace(topology, clusters=clusters)
