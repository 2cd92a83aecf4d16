"""Operator changes and the seam they travel through: `OperatorStore` (write, then applied).

An operator change (an override, a topology, an accepted alarm, a forgotten prober) is a value.
The admin API hands it to the control plane's `OperatorStore`; the store has it applied by a
`ChangeSink` (the control plane). Two stores:

- `LocalStore` (no `controlplane.store`): applied at once, in this replica only, as always;
- `EtcdStore` (controlplane/store/etcd.py): written to etcd, then applied by every replica,
  the writer included, from its watch of the prefix, in revision order.

Either way `submit` answers once the change is applied here, with the snapshot it made.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from controlplane.health.store import HealthStatus
from controlplane.snapshots.snapshot import Snapshot
from controlplane.store.replicas import ReplicaRecord
from controlplane.topology.model import Topology


@dataclass(frozen=True, slots=True)
class OverrideChange:
    """Pin an endpoint's status; `status` None clears the pin (`auto`)."""

    cluster: str
    endpoint: str
    status: HealthStatus | None
    who: str


@dataclass(frozen=True, slots=True)
class TopologyChange:
    """Serve a whole validated topology (from etcd: the fleet's part with this replica's own settings)."""

    topology: Topology
    who: str
    detail: str


@dataclass(frozen=True, slots=True)
class AcceptChange:
    """Apply the failures the mass-failure guard holds for `cluster` (an operator accepted its alarm)."""

    cluster: str
    who: str


@dataclass(frozen=True, slots=True)
class ForgetChange:
    """Forget a disconnected remote prober for good: its record, votes and alarm."""

    prober_id: str
    who: str


Change = OverrideChange | TopologyChange | AcceptChange | ForgetChange


class ChangeSink(Protocol):
    """Where changes are applied (the control plane); both raise ConfigError for a change that cannot apply."""

    @property
    def topology(self) -> Topology: ...

    def check_change(self, change: Change) -> None:
        """ConfigError (naming the field) if `change` cannot apply here now; changes nothing."""
        ...

    def apply_change(self, change: Change) -> Snapshot | None:
        """Apply `change`; the snapshot it published, None when Envoy sees nothing new."""
        ...

    def overrides(self) -> dict[tuple[str, str], HealthStatus]:
        """The pins applied now, by (cluster, endpoint)."""
        ...


class OperatorStore(Protocol):
    """Where operator changes are written and from where they are applied."""

    @property
    def shared(self) -> bool:
        """Whether other replicas apply what is written here (etcd) or only this one (local)."""
        ...

    async def submit(self, change: Change) -> Snapshot | None:
        """Write `change` and wait until it is applied here; ConfigError if it cannot apply,
        StoreUnavailable if the store cannot take it now."""
        ...

    def problems(self) -> list[str]:
        """Why the store is degraded (empty: it is not); /readyz lists them."""
        ...

    def replicas(self) -> list[ReplicaRecord]:
        """The other replicas' last published records (none without a shared store)."""
        ...

    def link_probers(self, linked: Iterable[str]) -> None:
        """The sharing probers this replica holds live links to now (registered in a shared store)."""
        ...

    def prober_members(self) -> dict[str, tuple[str, ...]] | None:
        """The sharing probers registered in the shared store (id -> the replicas holding its
        link); None without one, or while it cannot be read."""
        ...

    @property
    def down_reason(self) -> str:
        """Why the shared store cannot be reached now ("" when it can, or there is none)."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class LocalStore:
    """Today's behaviour: a change is applied at once, in this replica only (kept in its SQLite file)."""

    shared = False

    def __init__(self, sink: ChangeSink) -> None:
        self.sink = sink

    async def submit(self, change: Change) -> Snapshot | None:
        return self.sink.apply_change(change)

    def problems(self) -> list[str]:
        return []

    def replicas(self) -> list[ReplicaRecord]:
        return []

    def link_probers(self, linked: Iterable[str]) -> None:
        return None

    def prober_members(self) -> dict[str, tuple[str, ...]] | None:
        return None

    down_reason = ""

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
