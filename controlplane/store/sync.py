"""Operator state in etcd as plain values: the key layout, the encoding, and `Sync`, which turns
watch events and full loads into changes to apply, in revision order. No I/O here.

Keys, under the configured prefix (default `/healthplane`):

    {prefix}/topology                       the fleet's part of the topology (JSON)
    {prefix}/overrides/{cluster}/{endpoint} a pin: {"status": "UNHEALTHY" | null (auto), "who", "time"}
    {prefix}/accepts/{cluster}              the last accepted mass-failure alarm of a cluster
    {prefix}/forgotten/{prober}             the last time a prober was forgotten
    {prefix}/replicas/{id}                  a live replica (under its lease; controlplane/store/replicas.py)
    {prefix}/probers/{prober}/{replica}     a sharing prober linked to that replica (under the replica's
                                            lease; controlplane/store/probers.py)

Overrides and the topology are state: a full load makes this replica match them. Accepts and
forgotten probers are acts: a replica applies one when it sees it happen (a watch event, or a
full load after a gap that shows one newer than what it had applied), never those that predate
its start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote

from controlplane.errors import ConfigError
from controlplane.health.store import HealthStatus
from controlplane.store.changes import AcceptChange, Change, ForgetChange, OverrideChange, TopologyChange
from controlplane.store.fleet import fleet_document, fleet_topology
from controlplane.topology.model import Topology


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd holds it."""

    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One watch event: a put or a delete of `key` at `revision`."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A key this replica cannot apply (a bad value, a deleted topology): reported, never applied."""

    key: str
    reason: str


Item = tuple[int, Change | Skipped]  # (revision, what to apply or report)


class Keys:
    """The key layout under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self.root = self.prefix + "/"
        self.topology = self.root + "topology"

    def override(self, cluster: str, endpoint: str) -> str:
        return f"{self.root}overrides/{quote(cluster, safe='')}/{quote(endpoint, safe=':')}"

    def accept(self, cluster: str) -> str:
        return f"{self.root}accepts/{quote(cluster, safe='')}"

    def forgotten(self, prober_id: str) -> str:
        return f"{self.root}forgotten/{quote(prober_id, safe='')}"

    def replica(self, replica_id: str) -> str:
        return f"{self.root}replicas/{quote(replica_id, safe=':')}"

    @property
    def replicas(self) -> str:
        return self.root + "replicas/"

    def prober(self, prober_id: str, replica_id: str) -> str:
        return f"{self.root}probers/{quote(prober_id, safe='')}/{quote(replica_id, safe=':')}"

    @property
    def probers(self) -> str:
        return self.root + "probers/"

    def parse(self, key: str) -> tuple[str, ...]:
        """("topology",), ("overrides", cluster, endpoint), ("accepts", cluster), ... or () if not ours."""
        if not key.startswith(self.root):
            return ()
        parts = key[len(self.root) :].split("/")
        kind, rest = parts[0], tuple(unquote(p) for p in parts[1:])
        shapes = {"topology": 0, "overrides": 2, "accepts": 1, "forgotten": 1, "replicas": 1, "probers": 2}
        if shapes.get(kind) != len(rest) or any(not p for p in rest):
            return ()
        return (kind, *rest)


# --------------------------------------------------------------------------- values


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode_topology(topology: Topology, *, who: str, detail: str, now: float | None = None) -> bytes:
    """The fleet's part of `topology`, as written to `{prefix}/topology`."""
    doc = fleet_document(topology.document)
    return _json({"document": doc, "who": who, "detail": detail, "time": now or time.time()})


def encode_override(status: HealthStatus | None, *, who: str, now: float | None = None) -> bytes:
    return _json({"status": None if status is None else status.name, "who": who, "time": now or time.time()})


def encode_act(*, who: str, now: float | None = None) -> bytes:
    """An accept or a forget: who did it, and when."""
    return _json({"who": who, "time": now or time.time()})


def write_ops(keys: Keys, change: Change, *, orphans: Iterable[str] = ()) -> list[tuple[str, bytes | None]]:
    """The writes of one change, in order, as (key, value) with None for a delete; one transaction.

    A topology also deletes the pins of endpoints it no longer has (`orphans`, override keys):
    the local store drops them with the endpoint, and so must the shared one.
    """
    if isinstance(change, OverrideChange):
        return [(keys.override(change.cluster, change.endpoint), encode_override(change.status, who=change.who))]
    if isinstance(change, TopologyChange):
        live = {keys.override(c.name, e.key) for c in change.topology.clusters for e in c.endpoints}
        value = encode_topology(change.topology, who=change.who, detail=change.detail)
        return [(keys.topology, value), *((k, None) for k in sorted(set(orphans) - live))]
    if isinstance(change, AcceptChange):
        return [(keys.accept(change.cluster), encode_act(who=change.who))]
    return [(keys.forgotten(change.prober_id), encode_act(who=change.who))]


def _load(value: bytes) -> dict[str, Any]:
    data = json.loads(value.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _who(data: Mapping[str, Any]) -> str:
    who = data.get("who")
    return who if isinstance(who, str) and who else "etcd"


def decode_override(value: bytes) -> tuple[HealthStatus | None, str]:
    """(status, who) of an override value; ValueError if it is not one."""
    data = _load(value)
    status = data.get("status")
    if status is None:
        return None, _who(data)
    if not isinstance(status, str):
        raise ValueError(f"status must be a string or null, not {status!r}")
    return HealthStatus.parse(status), _who(data)


# --------------------------------------------------------------------------- sync


class Sync:
    """What this replica applied from etcd, and what to apply next.

    `events` takes watch events (applied in revision order, older ones refused); `reload` takes a
    full load (after a start, a reconnect past a compaction, or a watch error) and yields what
    differs from what is applied. `revision` is the last revision applied: a watch resumes after it.
    """

    def __init__(self, keys: Keys, running: Callable[[], Topology]) -> None:
        self.keys = keys
        self.running = running
        self.revision = 0
        self.loaded = False  # a full load has happened
        self._floor = 0  # events at or below this revision are in the last full load
        self._topology_revision = 0

    def events(self, events: Iterable[WatchEvent]) -> list[Item]:
        """The changes of watch events, sorted by revision; events older than applied are dropped."""
        out: list[Item] = []
        for event in sorted(events, key=lambda e: e.revision):  # stable: a transaction keeps its order
            if event.revision <= self._floor or event.revision < self.revision:
                continue
            self.revision = event.revision
            item = self._event(event)
            if item is not None:
                out.append((event.revision, item))
        return out

    def _event(self, event: WatchEvent) -> Change | Skipped | None:
        parsed = self.keys.parse(event.key)
        if not parsed or parsed[0] in ("replicas", "probers"):
            return None
        kind = parsed[0]
        if event.kind == "delete":
            if kind == "topology":
                return Skipped(event.key, "the fleet topology was deleted from etcd: the last one is served")
            if kind == "overrides":
                return OverrideChange(parsed[1], parsed[2], None, "etcd (key deleted)")
            return None  # an act's record going away undoes nothing
        return self._decode(parsed, event.key, event.value, event.revision)

    def _decode(self, parsed: tuple[str, ...], key: str, value: bytes, revision: int) -> Change | Skipped:
        kind = parsed[0]
        try:
            if kind == "topology":
                self._topology_revision = revision
                data = _load(value)
                document = data.get("document")
                if not isinstance(document, dict):
                    raise ValueError("no fleet document in it")
                source = f"etcd {key} (revision {revision})"
                topology = fleet_topology(document, self.running(), source=source)
                detail = str(data.get("detail") or "topology from etcd")
                return TopologyChange(topology, _who(data), f"{detail} (etcd revision {revision})")
            if kind == "overrides":
                status, who = decode_override(value)
                return OverrideChange(parsed[1], parsed[2], status, who)
            who = _who(_load(value))
            if kind == "accepts":
                return AcceptChange(parsed[1], who)
            return ForgetChange(parsed[1], who)
        except ConfigError as exc:
            return Skipped(key, str(exc))
        except (ValueError, UnicodeDecodeError) as exc:
            return Skipped(key, f"not a healthplane value: {exc}")

    def _serving(self, entry: KeyValue) -> bool:
        """Whether the fleet's part in `entry` is what this replica serves already (a seed, a restart)."""
        try:
            document = _load(entry.value).get("document")
        except (ValueError, UnicodeDecodeError):
            return False
        if document == fleet_document(self.running().document):
            self._topology_revision = entry.mod_revision
            return True
        return False

    def reload(
        self,
        entries: Iterable[KeyValue],
        revision: int,
        overrides: Callable[[], Mapping[tuple[str, str], HealthStatus]],
    ) -> Iterator[Item]:
        """What a full load at `revision` changes here, topology first.

        A generator on purpose: the caller applies each item before the next is computed, so the
        overrides are compared (`overrides()`, the pins applied now) against the new topology.
        """
        first = not self.loaded
        before = self.revision
        self.revision = self._floor = revision
        self.loaded = True
        pins: dict[tuple[str, str], tuple[HealthStatus | None, str, int]] = {}
        acts: list[tuple[int, Change | Skipped]] = []
        topology: KeyValue | None = None
        for entry in entries:
            parsed = self.keys.parse(entry.key)
            if not parsed:
                continue
            if parsed[0] == "topology":
                topology = entry
            elif parsed[0] == "overrides":
                try:
                    status, who = decode_override(entry.value)
                except (ValueError, UnicodeDecodeError) as exc:
                    acts.append((entry.mod_revision, Skipped(entry.key, f"not a healthplane value: {exc}")))
                    continue
                pins[(parsed[1], parsed[2])] = (status, who, entry.mod_revision)
            elif parsed[0] in ("accepts", "forgotten") and not first and entry.mod_revision > before:
                acts.append((entry.mod_revision, self._decode(parsed, entry.key, entry.value, entry.mod_revision)))
        if topology is not None and topology.mod_revision != self._topology_revision and not self._serving(topology):
            yield (
                topology.mod_revision,
                self._decode(("topology",), topology.key, topology.value, topology.mod_revision),
            )
        live = {(c.name, e.key) for c in self.running().clusters for e in c.endpoints}
        applied = overrides()
        for (cluster, endpoint), (status, who, rev) in sorted(pins.items()):
            if (cluster, endpoint) in live and applied.get((cluster, endpoint)) != status:
                yield rev, OverrideChange(cluster, endpoint, status, who)
        for cluster, endpoint in sorted(set(applied) - set(pins)):
            if (cluster, endpoint) in live:
                yield revision, OverrideChange(cluster, endpoint, None, "etcd (not pinned there)")
        yield from sorted(acts, key=lambda item: item[0])
