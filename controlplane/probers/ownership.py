"""Which probers check an endpoint when several share the work: rendezvous hashing (pure).

Each endpoint is checked by `replicas` (R) of the live probers: the R with the highest weight
BLAKE2b(`member` NUL `cluster/address:port`). Highest-random-weight hashing gives, with no
coordination beyond the member list:

- every replica and every process computes the same owners from the same members (BLAKE2b, not
  `hash()`, which is salted per process);
- a member that leaves moves only the endpoints it owned (each to the next-highest weight);
- a member that joins takes about R/N of the endpoints, from the others;
- the R owners of an endpoint are distinct members (fewer when there are fewer than R members).

The endpoint's key names its cluster: an address in two clusters is two endpoints, each with its
own owners, as the quorum and the health store count them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from controlplane.health.store import EndpointId
from controlplane.topology.model import Topology

__all__ = ["Members", "Ownership", "choose_members", "endpoint_key", "owners", "weight"]


def endpoint_key(cluster: str, endpoint: str) -> str:
    """The key an endpoint is hashed by: `cluster/address:port`."""
    return f"{cluster}/{endpoint}"


def weight(member: str, key: str) -> int:
    """The rendezvous weight of `member` for `key` (64 bits, the same in every process)."""
    digest = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(key: str, members: Iterable[str], replicas: int) -> tuple[str, ...]:
    """The `replicas` members (distinct, highest weight first) that check `key`."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    # Ties (64-bit collisions) are broken by the member id, so the order is total.
    ranked = sorted(set(members), key=lambda m: (weight(m, key), m), reverse=True)
    return tuple(ranked[:replicas])


@dataclass(frozen=True, slots=True)
class Ownership:
    """The owners of every endpoint of one topology for one member list; computed lazily, once."""

    members: tuple[str, ...]  # sorted, distinct
    replicas: int
    _owners: dict[EndpointId, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, members: Iterable[str], replicas: int) -> Ownership:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        return cls(tuple(sorted(set(members))), replicas)

    def owners(self, cluster: str, endpoint: str) -> tuple[str, ...]:
        """The members that check this endpoint (empty when there are no members)."""
        key = (cluster, endpoint)
        found = self._owners.get(key)
        if found is None:
            found = owners(endpoint_key(cluster, endpoint), self.members, self.replicas) if self.members else ()
            self._owners[key] = found
        return found

    def owns(self, member: str, cluster: str, endpoint: str) -> bool:
        return member in self.owners(cluster, endpoint)

    def share(self, member: str, topology: Topology) -> set[EndpointId]:
        """The endpoints of `topology` that `member` checks."""
        return {(c.name, e.key) for c in topology.clusters for e in c.endpoints if self.owns(member, c.name, e.key)}

    def counts(self, topology: Topology) -> dict[str, int]:
        """How many endpoints of `topology` each member checks."""
        out = dict.fromkeys(self.members, 0)
        for c in topology.clusters:
            for e in c.endpoints:
                for m in self.owners(c.name, e.key):
                    out[m] += 1
        return out


@dataclass(frozen=True, slots=True)
class Members:
    """The probers that share the endpoints, and where that list came from.

    `source` is "etcd" (the prober registrations every replica watches: the same list on every
    replica) or "local" (this replica's own link records); `reason` says why the local records
    are used when a store is configured; `holders` names, per member from etcd, the replicas
    that hold its link.
    """

    ids: tuple[str, ...]
    source: str
    reason: str = ""
    holders: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)


def choose_members(
    local: Sequence[str],
    *,
    store: bool,
    registered: Mapping[str, Sequence[str]] | None,
    down: str = "",
    replica: str = "",
) -> Members:
    """The members to compute the owners from.

    Without a store (`store` False): this replica's live links (`local`). With one: the probers
    registered in etcd (`registered`: prober id -> the replicas holding its link), so every
    replica computes the same owners, and this replica's own live links (`replica` holds them),
    which it registers itself: a prober that just linked here is not left without a share
    until its registration comes back through the watch. While etcd cannot be read
    (`registered` None, `down` the reason): the local links again, saying why. Verdicts never
    wait for etcd either way.
    """
    if not store:
        return Members(tuple(sorted(set(local))), "local")
    if registered is None:
        why = f"etcd unavailable ({down})" if down else "etcd unavailable"
        return Members(tuple(sorted(set(local))), "local", f"{why}: members from this replica's own prober links")
    holders: dict[str, set[str]] = {p: set(r) for p, r in registered.items() if r}
    for p in local:
        holders.setdefault(p, set()).add(replica)
    return Members(tuple(sorted(holders)), "etcd", holders={p: tuple(sorted(r)) for p, r in sorted(holders.items())})
