"""Which node sees which truth, and since when: propagation measured at every node's ACK.

`PropagationTracker` is fed by the ADS stream callbacks and by every published snapshot. For
each version it keeps the cause (and its time), when the snapshot was built, and per node that
the version concerns: when a response carrying it (or a later version) was sent, and when that
was ACKed or NACKed. From those:

- propagation delay, per node and version: ACK time minus cause time;
- convergence time, per version: the last expected node's ACK minus the cause time;
- lag, per node: how many tracked versions it has not ACKed yet, and for how long.

A version concerns a node when the node subscribes to something the version changed (for CDS
and LDS, whose responses carry every resource, any new type version; for EDS and RDS, a changed
resource it subscribes to), so EDS-only pushes are measured too and nodes a change does not
reach are not waited for. A later version ACKed also settles earlier ones: a node that was
sent version 7 before it ACKed 6 has seen what 6 said. The send time is the answered response's
`TypeState.sent_at` (stamped after any modelled delay), so only two hooks run per push:
`on_snapshot` once, `on_request` per ACK. Synchronous and clock-injectable; the history is
bounded (`limit` versions).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.observe.nodes import NodeStreams
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Snapshot, changed_resources, version_key
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import RequestKind, RequestOutcome, StreamState

# One bit per type URL keeps a node's outstanding types in a plain int (thousands per version).
_BIT = {t: 1 << i for i, t in enumerate(rs.ADS_ORDER)}

Observe = Callable[[float, str], None]  # (seconds, cause kind)


@dataclass(slots=True)
class Delivery:
    """One version on its way to one node (a view built from a VersionRecord)."""

    node: str
    types: int  # bitmask of the types still to be ACKed (see _BIT)
    sent: float | None = None  # first response carrying this version (or a later one)
    acked: float | None = None
    nacked: float | None = None
    error: str | None = None
    disconnected: float | None = None

    @property
    def status(self) -> str:
        if self.acked is not None:
            return "acked"
        if self.nacked is not None:
            return "nacked"
        if self.disconnected is not None:
            return "disconnected"
        return "sent" if self.sent is not None else "waiting"

    @property
    def resolved(self) -> bool:
        return self.acked is not None or self.nacked is not None or self.disconnected is not None


@dataclass(slots=True)
class VersionRecord:
    """One snapshot version: its cause and where it has reached.

    Per node, plain dicts of ints and floats rather than an object each: a push to 5,000 nodes
    then allocates nothing the garbage collector tracks (bench/propagation.py).
    """

    version: str
    key: tuple[int, int]
    cause_kind: str
    cause_detail: str
    cause_time: float
    created: float
    types: dict[str, int] = field(default_factory=dict)  # every concerned node -> types not ACKed yet
    sent: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    nacked: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)  # disconnected before answering
    pending: int = 0
    converged_at: float | None = None  # when the last expected node resolved
    last_ack: float | None = None

    @property
    def convergence(self) -> float | None:
        """Seconds from the cause to the last expected node's ACK, once no node is pending."""
        if self.pending or self.last_ack is None:
            return None
        return self.last_ack - self.cause_time

    def resolved(self, node: str) -> bool:
        return node in self.acked or node in self.nacked or node in self.gone

    def delivery(self, node: str) -> Delivery:
        return Delivery(
            node,
            self.types[node],
            self.sent.get(node),
            self.acked.get(node),
            self.nacked.get(node),
            self.errors.get(node),
            self.gone.get(node),
        )

    @property
    def deliveries(self) -> dict[str, Delivery]:
        """Every concerned node's delivery, built on demand (views and tests)."""
        return {node: self.delivery(node) for node in self.types}

    def delays(self) -> list[float]:
        """Propagation delays (ACK minus cause, seconds) of the nodes that ACKed, sorted."""
        base = self.cause_time
        return sorted(t - base for t in self.acked.values())

    def summary(self, now: float) -> dict[str, Any]:
        resolved = len(self.acked) + len(self.nacked) + len(self.gone)
        in_flight = sum(1 for n in self.sent if not self.resolved(n))
        delays = self.delays()
        convergence = self.convergence
        return {
            "version": self.version,
            "cause": {"kind": self.cause_kind, "detail": self.cause_detail, "time": self.cause_time},
            "created": self.created,
            "snapshot_ms": _ms(self.created - self.cause_time),
            "nodes": len(self.types),
            "acked": len(self.acked),
            "nacked": len(self.nacked),
            "disconnected": len(self.gone),
            "sent": in_flight,
            "waiting": len(self.types) - resolved - in_flight,
            "pending": self.pending,
            "converged": self.pending == 0,
            "convergence_ms": _ms(convergence),
            # While nodes are pending: how long the fleet has disagreed so far.
            "age_ms": None if self.pending == 0 else _ms(now - self.cause_time),
            "delay_p50_ms": _ms(percentile(delays, 50)),
            "delay_p99_ms": _ms(percentile(delays, 99)),
            "delay_max_ms": _ms(delays[-1] if delays else None),
        }

    def detail(self, now: float) -> dict[str, Any]:
        base = self.cause_time
        nodes = []
        for node in sorted(self.types):
            d = self.delivery(node)
            nodes.append(
                {
                    "node": node,
                    "status": d.status,
                    "sent_ms": _ms(None if d.sent is None else d.sent - base),
                    "ack_ms": _ms(None if d.acked is None else d.acked - base),
                    "nack_ms": _ms(None if d.nacked is None else d.nacked - base),
                    "error": d.error,
                    "disconnected_ms": _ms(None if d.disconnected is None else d.disconnected - base),
                    "types": [rs.SHORT_NAMES[t] for t, bit in _BIT.items() if d.types & bit],
                }
            )
        return {
            **self.summary(now),
            "not_acked": sorted(n for n in self.types if not self.resolved(n)),
            "per_node": nodes,
        }


@dataclass(slots=True)
class NodeLag:
    node: str
    version: str | None  # the newest tracked version this node has ACKed
    acked_at: float | None
    versions_behind: int
    behind_ms: float | None  # since the cause of the oldest version it has not ACKed

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "acked_at": self.acked_at,
            "versions_behind": self.versions_behind,
            "behind_ms": self.behind_ms,
        }


class PropagationTracker(StreamCallbacks):
    """Per version and node: sent, ACKed, NACKed; convergence and lag. See the module docstring."""

    def __init__(
        self,
        *,
        streams: NodeStreams,
        limit: int = 32,
        clock: Callable[[], float] = time.time,
        observe_delay: Observe | None = None,
        observe_convergence: Observe | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.clock = clock
        self.observe_delay = observe_delay
        self.observe_convergence = observe_convergence
        self.records: OrderedDict[str, VersionRecord] = OrderedDict()
        # The one registry of node streams (observe/nodes.py): it must see a stream's open and close
        # before this tracker does (it comes first in the callback chain).
        self._nodes = streams
        # Per node: the records it has not resolved yet, oldest first.
        self._open: dict[str, list[VersionRecord]] = {}
        self._acked_key: dict[str, tuple[int, int]] = {}  # node -> key of the newest version it ACKed
        self._acked_at: dict[str, float] = {}
        self._keys: dict[str, tuple[int, int]] = {}  # version string -> key, for the ACKs of a push

    # ------------------------------------------------------------------ inputs

    def on_snapshot(self, snapshot: Snapshot, previous: Snapshot | None) -> VersionRecord:
        """Record a newly published snapshot and the connected nodes it concerns."""
        record = VersionRecord(
            version=snapshot.version,
            key=version_key(snapshot.version),
            cause_kind=snapshot.cause.kind,
            cause_detail=snapshot.cause.detail,
            cause_time=snapshot.cause.time,
            created=snapshot.created,
        )
        changed = changed_types(previous, snapshot)
        if changed:
            types, opened = record.types, self._open
            for stream in self._nodes.streams():
                node = stream.node_key
                mask = affected_types(stream, changed)
                if mask:
                    types[node] = mask
                    mine = opened.get(node)
                    if mine is None:
                        mine = opened[node] = []
                    mine.append(record)
        record.pending = len(record.types)
        if record.pending == 0:
            record.converged_at = record.created
        self.records[record.version] = record
        while len(self.records) > self.limit:
            _, old = self.records.popitem(last=False)
            for node in old.types:
                if not old.resolved(node) and (records := self._open.get(node)):
                    records.remove(old)
        return record

    def on_stream_closed(self, stream: StreamState) -> None:
        node = stream.node_key
        if stream.node_id is None or self._nodes.get(node) is not None:
            return  # a newer stream of the node replaced this one: its versions are still in flight
        now = self.clock()
        for record in self._open.pop(node, []):
            record.gone[node] = now
            self._resolved(record, now)
        self._acked_key.pop(node, None)
        self._acked_at.pop(node, None)

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        kind = outcome.kind
        if kind is not RequestKind.ACK and kind is not RequestKind.NACK:
            return
        node = stream.node_key
        ts = stream.types.get(outcome.type_url)
        if ts is None:
            return
        # An ACK names the type version the node now has; a NACK rejects the last one sent. Either
        # way the response was built from that version's snapshot or a later one, so it settles
        # every tracked version up to it. (No on_response hook: one callback less per node.)
        named = outcome.version if kind is RequestKind.ACK else ts.sent_version
        if not named:
            return
        key = self._keys.get(named)
        if key is None:
            if len(self._keys) > 4 * self.limit:
                self._keys.clear()
            key = self._keys[named] = version_key(named)
        now = self.clock()
        records = self._open.get(node)
        bit = _BIT[outcome.type_url]
        if kind is RequestKind.ACK:
            if (acked := self._acked_key.get(node)) is None or acked < key:
                self._acked_key[node], self._acked_at[node] = key, now
        if not records:
            return
        i = 0  # resolved records leave the node's list in place: no allocation per ACK
        while i < len(records):
            record = records[i]
            if record.key > key:
                break
            mask = record.types[node]
            if not mask & bit:
                i += 1
                continue
            if ts.sent_at is not None:  # the response this answers (it carried this version or a later one)
                record.sent[node] = ts.sent_at
            if kind is RequestKind.NACK:
                record.nacked[node] = now
                record.errors[node] = outcome.error or ""
            else:
                mask &= ~bit
                record.types[node] = mask
                if mask:
                    i += 1
                    continue
                record.acked[node] = now
                record.last_ack = now
                if self.observe_delay is not None:
                    self.observe_delay(now - record.cause_time, record.cause_kind)
            del records[i]
            self._resolved(record, now)

    def _resolved(self, record: VersionRecord, now: float) -> None:
        record.pending -= 1
        if record.pending == 0:
            record.converged_at = now
            convergence = record.convergence
            if convergence is not None and self.observe_convergence is not None:
                self.observe_convergence(convergence, record.cause_kind)

    # ------------------------------------------------------------------ views

    def get(self, version: str) -> VersionRecord | None:
        """A tracked version, its in-flight nodes' send times filled in from their streams."""
        record = self.records.get(version)
        if record is not None:
            self._fill_sent(record)
        return record

    def _fill_sent(self, record: VersionRecord) -> None:
        for node, mask in record.types.items():
            if node in record.sent or record.resolved(node) or (stream := self._nodes.get(node)) is None:
                continue
            for type_url, bit in _BIT.items():
                ts = stream.types.get(type_url)
                if mask & bit and ts is not None and ts.sent_at is not None and ts.sent_version:
                    if version_key(ts.sent_version) >= record.key:
                        record.sent[node] = ts.sent_at
                        break

    def recent(self, limit: int | None = None) -> list[VersionRecord]:
        """The tracked versions, newest first."""
        out = list(reversed(self.records.values()))
        out = out if limit is None else out[: max(0, limit)]
        for record in out:
            self._fill_sent(record)
        return out

    def lag(self, node: str) -> NodeLag:
        records = self._open.get(node) or []
        acked = self._acked_key.get(node)
        behind = None
        if records:
            behind = _ms(self.clock() - min(r.cause_time for r in records))
        elif self._nodes.get(node) is not None:
            behind = 0.0
        return NodeLag(
            node=node,
            version=_version_of(acked) if acked else None,
            acked_at=self._acked_at.get(node),
            versions_behind=len(records),
            behind_ms=behind,
        )

    def nodes(self) -> list[str]:
        return sorted(s.node_key for s in self._nodes.streams())


def changed_types(previous: Snapshot | None, snapshot: Snapshot) -> list[tuple[str, int, frozenset[str] | None]]:
    """What `snapshot` changed, per type: (type URL, bit, changed names; None for a full-state type)."""
    changed = changed_resources(previous, snapshot)
    out: list[tuple[str, int, frozenset[str] | None]] = []
    for type_url, bit in _BIT.items():
        if type_url in rs.FULL_STATE_TYPES:
            if previous is None or previous.type_versions[type_url] != snapshot.type_versions[type_url]:
                out.append((type_url, bit, None))
        elif names := changed.get(type_url):
            out.append((type_url, bit, frozenset(names)))
    return out


def affected_types(stream: StreamState, changed: list[tuple[str, int, frozenset[str] | None]]) -> int:
    """The types (a _BIT mask) in which a change gives this stream something new to apply."""
    mask = 0
    types = stream.types
    for type_url, bit, names in changed:
        ts = types.get(type_url)
        if ts is not None and (names is None or ts.wildcard or not names.isdisjoint(ts.names)):
            mask |= bit
    return mask


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    seq = list(values)
    if not seq:
        return None
    return seq[max(0, math.ceil(q / 100 * len(seq)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _version_of(key: tuple[int, int]) -> str:
    return f"{key[0]}.{key[1]}"
