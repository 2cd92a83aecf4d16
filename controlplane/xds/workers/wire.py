"""What crosses the main<->worker channel: snapshots down, once each, as bytes; stream records up.

A snapshot goes to a worker as the bytes the main process already holds: per type, the names in
order and, for each resource that is not the same object as in the snapshot that worker got
last, its name, version, serialized bytes and delta digest. The worker frames them (`Any`,
`DiscoveryResponse.resources`: concatenation, no protobuf encoding) and reuses its previous
`Resource` objects for everything else, so identity-based diffs (delta streams) work as in one
process. The frame is encoded once per snapshot and written to every worker that has the same
base; the topology travels only when it is another object.

Records go up as plain tuples (see `Recorder`), batched by the worker.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from controlplane.snapshots.snapshot import Cause, Resource, Snapshot
from controlplane.topology.model import Topology

# One changed resource: name, version, serialized bytes, delta digest.
ResourceWire = tuple[str, str, bytes, str]
# Per type: the names in order (None: the same as the base's) and the resources that changed.
TableWire = tuple[tuple[str, ...] | None, list[ResourceWire]]


@dataclass(frozen=True, slots=True)
class SnapshotFrame:
    """A snapshot as a worker receives it (pickled once, written to every worker)."""

    base: str | None  # the version this frame is relative to (None: a full snapshot)
    version: str
    cause: tuple[str, str, float]
    created: float
    type_versions: dict[str, str]
    topology: Topology | None  # None: the base's topology
    tables: dict[str, TableWire]


def encode_snapshot(snapshot: Snapshot, base: Snapshot | None) -> bytes:
    """The frame of `snapshot` for a worker that holds `base` (None: one that holds nothing)."""
    tables: dict[str, TableWire] = {}
    for type_url, table in snapshot.resources.items():
        before: Mapping[str, Resource] = base.resources.get(type_url, {}) if base is not None else {}
        names = tuple(table)
        same_names = base is not None and names == tuple(before)
        changed = [
            (r.name, r.version, r.serialized, r.delta_version) for n, r in table.items() if before.get(n) is not r
        ]
        tables[type_url] = (None if same_names else names, changed)
    frame = SnapshotFrame(
        base=None if base is None else base.version,
        version=snapshot.version,
        cause=(snapshot.cause.kind, snapshot.cause.detail, snapshot.cause.time),
        created=snapshot.created,
        type_versions=dict(snapshot.type_versions),
        topology=None if base is not None and base.topology is snapshot.topology else snapshot.topology,
        tables=tables,
    )
    return pickle.dumps(("snapshot", frame), protocol=pickle.HIGHEST_PROTOCOL)


class SnapshotDecoder:
    """A worker's side: frames in, `Snapshot`s out, sharing unchanged resources with the last one."""

    def __init__(self) -> None:
        self.last: Snapshot | None = None

    def decode(self, frame: SnapshotFrame) -> Snapshot:
        base = self.last
        if frame.base is not None and (base is None or base.version != frame.base):
            raise ValueError(f"snapshot {frame.version} is relative to {frame.base}, this worker holds "
                             f"{None if base is None else base.version}")  # fmt: skip
        topology = frame.topology if frame.topology is not None else (base.topology if base is not None else None)
        if topology is None:
            raise ValueError(f"snapshot {frame.version} came without a topology")
        resources: dict[str, Mapping[str, Resource]] = {}
        for type_url, (names, changed) in frame.tables.items():
            before: Mapping[str, Resource] = base.resources.get(type_url, {}) if base is not None else {}
            fresh = {
                name: Resource.from_serialized(name, type_url, version, data, digest)
                for name, version, data, digest in changed
            }
            order = names if names is not None else tuple(before)
            resources[type_url] = MappingProxyType({n: fresh[n] if n in fresh else before[n] for n in order})
        snapshot = Snapshot(
            version=frame.version,
            cause=Cause(*frame.cause),
            created=frame.created,
            topology=topology,
            resources=MappingProxyType(resources),
            type_versions=MappingProxyType(frame.type_versions),
            endpoints=(),  # the admin API's view: the main process's
        )
        self.last = snapshot
        return snapshot


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """A message from the other end of a private socketpair (our own process: trusted)."""
    return pickle.loads(data)
