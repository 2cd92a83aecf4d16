"""Sharding one prober's endpoints across processes (pure)."""

from __future__ import annotations

from collections import Counter

import pytest

from controlplane.topology.model import Cluster, Endpoint, HealthCheck, Topology
from prober.shards import shard_of, shard_topology

KEYS = [f"10.0.{i // 250}.{i % 250}:8080" for i in range(4000)]
# Known answers: a change of hash would re-shard every running fleet at upgrade, silently.
PINNED = [0, 0, 1, 0, 0, 0, 0, 0, 1, 0]


def test_one_shard_owns_everything() -> None:
    assert {shard_of(k, 1) for k in KEYS} == {0}


def test_shards_are_balanced_and_stable() -> None:
    counts = Counter(shard_of(k, 4) for k in KEYS)
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 <= c <= 1200 for c in counts.values()), counts
    # No per-process salt: the same key lands on the same shard in every process, every run.
    assert [shard_of(k, 4) for k in KEYS[:50]] == [shard_of(k, 4) for k in KEYS[:50]]
    assert [shard_of(f"127.0.0.1:{port}", 2) for port in range(80, 90)] == PINNED


def test_adding_a_shard_moves_only_its_share() -> None:
    moved = [k for k in KEYS if shard_of(k, 3) != shard_of(k, 4)]
    # Rendezvous hashing: only the endpoints the new shard wins move, about 1/4 of them.
    assert all(shard_of(k, 4) == 3 for k in moved)
    assert 0.18 < len(moved) / len(KEYS) < 0.32


def test_bad_shard_numbers_are_refused() -> None:
    with pytest.raises(ValueError):
        shard_of("10.0.0.1:80", 0)
    with pytest.raises(ValueError):
        shard_topology(Topology(), 2, 2)


def test_shard_topology_partitions_endpoints_and_keeps_clusters() -> None:
    hc = HealthCheck(kind="tcp")
    endpoints = tuple(Endpoint(f"10.1.0.{i}", 80, health_check=hc) for i in range(1, 101))
    topology = Topology(clusters=(Cluster("web", endpoints, health_check=hc), Cluster("empty", ())))
    parts = [shard_topology(topology, s, 3) for s in range(3)]
    seen = [ep.key for part in parts for ep in part.clusters[0].endpoints]
    assert sorted(seen) == sorted(ep.key for ep in endpoints)  # each endpoint exactly once
    assert all([c.name for c in part.clusters] == ["web", "empty"] for part in parts)
    assert all(ep.health_check is hc for part in parts for ep in part.clusters[0].endpoints)
