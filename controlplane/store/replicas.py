"""Which replicas serve the fleet, and whether they agree (`GET /replicas`, issue 17).

Each replica with a store registers `{prefix}/replicas/{id}` under an etcd lease (gone within the
lease's TTL after the replica is), and publishes there its admin URL, xDS address, current
snapshot version and the digest of the EDS content it serves (`Snapshot.eds_digest`), at most
once per `PUBLISH_INTERVAL`. Versions differ between replicas by design (each has its own
epoch); the digest is what is the same when they serve the same endpoints with the same health.
Plain values here; the lease and the writes are in controlplane/store/etcd.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

LEASE_TTL = 10  # seconds: a replica that stops refreshing leaves the list this long after
PUBLISH_INTERVAL = 1.0  # seconds: the most often a replica rewrites its record


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """One replica as it describes itself."""

    id: str
    admin_url: str
    xds_address: str
    version: str
    eds_digest: str
    updated: float = field(default=0.0, compare=False)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()


def decode_record(value: bytes) -> ReplicaRecord | None:
    """A record read from etcd; None if it is not one (written by something else)."""
    try:
        data = json.loads(value.decode("utf-8"))
        record = ReplicaRecord(
            id=str(data["id"]),
            admin_url=str(data["admin_url"]),
            xds_address=str(data["xds_address"]),
            version=str(data["version"]),
            eds_digest=str(data["eds_digest"]),
            updated=float(data.get("updated", 0.0)),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return record


def publish_due(record: ReplicaRecord, published: ReplicaRecord | None, last: float, now: float) -> bool:
    """Whether to write `record` now: it changed since the last write, and that was long enough ago."""
    return record != published and now - last >= PUBLISH_INTERVAL


def replicas_view(
    others: Iterable[ReplicaRecord], me: ReplicaRecord, *, store: str, problems: list[str], now: float | None = None
) -> dict[str, Any]:
    """The JSON of GET /replicas: every replica (this one as it is now), and whether their EDS agrees."""
    now = time.time() if now is None else now
    rows = {r.id: r for r in others}
    rows[me.id] = me
    out = []
    for record in sorted(rows.values(), key=lambda r: r.id):
        row: dict[str, Any] = asdict(record)
        row["self"] = record.id == me.id
        row["age"] = round(max(0.0, now - record.updated), 3) if record.updated else None
        out.append(row)
    digests = {r.eds_digest for r in rows.values()}
    return {
        "store": store,
        "self": me.id,
        "agree": len(digests) == 1,
        "eds_digests": len(digests),
        "replicas": out,
        "problems": problems,
    }
