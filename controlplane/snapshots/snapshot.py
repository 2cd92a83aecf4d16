"""Immutable, versioned snapshots of every xDS resource, each serialized once per version.

A snapshot is what the control plane serves at one moment. Building one from a topology and
the endpoints' health reuses the previous snapshot's resources (and their bytes and versions)
wherever nothing changed, so a health flip re-serializes one ClusterLoadAssignment and nothing
else, and a topology edit builds only the clusters whose model (or endpoints' health) changed.
Response bodies are encoded once per (type, resource set) and shared by every stream; a stream
only appends its own nonce (see `encode_response`).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.topology.model import Topology

# --------------------------------------------------------------------------- versions


class VersionClock:
    """Versions `EPOCH.SEQ`: EPOCH is the start time in ms, so versions never repeat across
    restarts and a restarted control plane's versions sort after its predecessor's."""

    def __init__(self, epoch: int | None = None) -> None:
        self.epoch = epoch if epoch is not None else int(time.time() * 1000)
        self.seq = 0

    def next(self) -> str:
        self.seq += 1
        return f"{self.epoch}.{self.seq}"


def version_key(version: str) -> tuple[int, int]:
    """Sort key of a version string; unparseable versions (another server's) sort first."""
    try:
        epoch, seq = version.split(".", 1)
        return int(epoch), int(seq)
    except ValueError:
        return (-1, -1)


# --------------------------------------------------------------------------- wire encoding


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _length_delimited(field_number: int, data: bytes) -> bytes:
    return _varint((field_number << 3) | 2) + _varint(len(data)) + data


# DiscoveryResponse field numbers (envoy/service/discovery/v3/discovery.proto).
_VERSION_INFO, _RESOURCES, _TYPE_URL, _NONCE, _CONTROL_PLANE = 1, 2, 4, 5, 6


# DeltaDiscoveryResponse (system_version_info 1, resources 2, type_url 4, nonce 5 as above) and
# its Resource (version 1, resource 2, name 3).
_REMOVED_RESOURCES = 6


def content_version(type_url: str, serialized: bytes) -> str:
    """A resource's delta xDS version: a 64-bit BLAKE2b digest of its bytes, 11 characters.

    The same bytes carry the same version in every process and across restarts. Other bytes get
    the same version with probability 2**-64 per comparison, and only one comparison matters: a
    reconnecting node's `initial_resource_versions` entry against the current resource of that
    same name (within a stream, what a node holds is tracked by snapshot version, not digest). A
    fleet making 10**12 such comparisons over its life (10,000 nodes x 10,000 resources x 10,000
    reconnects with changed content) meets a collision with probability about 5e-8; the cost of
    one would be a resource left at its previous bytes until its next change. 96 bits would cost
    5 more bytes with every resource sent (xds_protocol: the version is opaque to the client).
    Versions of another length (an earlier release's 16 characters) never match: after such an
    upgrade a reconnecting node is sent everything once.
    """
    digest = hashlib.blake2b(serialized, digest_size=8, person=type_url[-16:].encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def encode_response(body: bytes, nonce: str) -> bytes:
    """The shared response body plus this stream's nonce: a complete DiscoveryResponse.

    Protobuf parsers accept fields in any order, so appending the nonce field to bytes that were
    encoded once is the same message as encoding it with the nonce.
    """
    return body + _length_delimited(_NONCE, nonce.encode())


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True, slots=True)
class Resource:
    """One xDS resource at one version, with its bytes computed once."""

    name: str
    type_url: str
    version: str
    serialized: bytes
    # The resource wrapped in an Any and framed as DiscoveryResponse.resources, ready to join.
    response_field: bytes
    # Delta xDS, computed on first use (a state-of-the-world-only fleet never pays for it): the
    # version Envoy holds it at (`content_version`), and the resource framed as a
    # DeltaDiscoveryResponse.resources entry (name, version, Any), ready to join.
    _delta: tuple[str, bytes] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, name: str, message: Message, version: str) -> Resource:
        type_url = rs.type_name(message)
        serialized = message.SerializeToString(deterministic=True)
        return cls(name, type_url, version, serialized, _length_delimited(_RESOURCES, _any(type_url, serialized)))

    @classmethod
    def from_serialized(
        cls, name: str, type_url: str, version: str, serialized: bytes, delta_version: str | None = None
    ) -> Resource:
        """A resource from bytes serialized elsewhere (an xDS worker process): framed, not re-encoded;
        `delta_version` is the digest computed there, if it was."""
        resource = cls(name, type_url, version, serialized, _length_delimited(_RESOURCES, _any(type_url, serialized)))
        if delta_version is not None:
            object.__setattr__(resource, "_delta", (delta_version, resource._delta_entry(delta_version)))
        return resource

    @property
    def delta_version(self) -> str:
        return self._delta_parts()[0]

    @property
    def delta_field(self) -> bytes:
        return self._delta_parts()[1]

    def _delta_parts(self) -> tuple[str, bytes]:
        parts = self._delta
        if parts is None:
            version = content_version(self.type_url, self.serialized)
            parts = (version, self._delta_entry(version))
            object.__setattr__(self, "_delta", parts)  # a cache: the resource's meaning never changes
        return parts

    def _delta_entry(self, version: str) -> bytes:
        entry = (
            _length_delimited(3, self.name.encode())
            + _length_delimited(1, version.encode())
            + _length_delimited(2, _any(self.type_url, self.serialized))
        )
        return _length_delimited(_RESOURCES, entry)


def _any(type_url: str, serialized: bytes) -> bytes:
    return _length_delimited(1, type_url.encode()) + _length_delimited(2, serialized)


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a snapshot exists: a verdict, an override, a topology edit."""

    kind: str  # "verdict", "override", "topology", "start"
    detail: str
    time: float


@dataclass(frozen=True, slots=True)
class EndpointView:
    """An endpoint as a snapshot serves it, for the admin API and diffs."""

    cluster: str
    address: str
    port: int
    status: HealthStatus
    zone: str
    weight: int


@dataclass(eq=False)
class Snapshot:
    """Every resource served at one version. Never mutated once published."""

    version: str
    cause: Cause
    created: float
    topology: Topology
    resources: Mapping[str, Mapping[str, Resource]]  # type_url -> name -> resource
    type_versions: Mapping[str, str]
    endpoints: tuple[EndpointView, ...]
    # Per cluster, the endpoints' health its ClusterLoadAssignment was built from: the next
    # snapshot reuses the resource when neither the cluster nor these changed.
    health_inputs: Mapping[str, tuple[HealthStatus, ...]] = field(default_factory=dict, repr=False)
    _bodies: dict[tuple[str, tuple[str, ...]], bytes] = field(default_factory=dict, repr=False)
    _delta_bodies: dict[tuple[str, tuple[str, ...], tuple[str, ...]], bytes] = field(default_factory=dict, repr=False)
    _eds_digest: str | None = field(default=None, repr=False)

    def eds_digest(self) -> str:
        """A digest of the EDS content served: every ClusterLoadAssignment's encoded bytes, by name.

        The same on every replica serving the same topology and health, whatever its version
        string (which differs by replica): what GET /replicas compares (issue 17)."""
        if self._eds_digest is None:
            h = hashlib.sha256()
            for name, resource in sorted(self.resources[rs.ENDPOINT].items()):
                h.update(_length_delimited(1, name.encode()) + _length_delimited(2, resource.serialized))
            self._eds_digest = h.hexdigest()[:32]
        return self._eds_digest

    def listener_names_for(self, node_cluster: str, *, wildcard: bool = True) -> tuple[str, ...]:
        """The listeners a node may get. API listeners (gRPC services) only go to nodes that ask
        for them by name, as gRPC clients do: Envoy subscribes to LDS by wildcard and would
        reject a listener without an address."""
        names = tuple(lst.name for lst in self.topology.listeners if lst.for_node(node_cluster))
        if wildcard:
            return names
        return names + tuple(svc.name for svc in self.topology.grpc_services)

    def response_body(self, type_url: str, names: tuple[str, ...]) -> bytes:
        """DiscoveryResponse bytes (all but the nonce) carrying `names`, encoded once."""
        key = (type_url, names)
        body = self._bodies.get(key)
        if body is None:
            table = self.resources[type_url]
            parts = [_length_delimited(_VERSION_INFO, self.type_versions[type_url].encode())]
            parts.extend(table[name].response_field for name in names)
            parts.append(_length_delimited(_TYPE_URL, type_url.encode()))
            body = b"".join(parts)
            self._bodies[key] = body
        return body

    def delta_response_body(self, type_url: str, names: tuple[str, ...], removed: tuple[str, ...]) -> bytes:
        """DeltaDiscoveryResponse bytes (all but the nonce): `names` sent, `removed` gone; encoded once."""
        key = (type_url, names, removed)
        body = self._delta_bodies.get(key)
        if body is None:
            table = self.resources[type_url]
            parts = [_length_delimited(_VERSION_INFO, self.type_versions[type_url].encode())]
            parts.extend(table[name].delta_field for name in names)
            parts.append(_length_delimited(_TYPE_URL, type_url.encode()))
            parts.extend(_length_delimited(_REMOVED_RESOURCES, name.encode()) for name in removed)
            body = b"".join(parts)
            self._delta_bodies[key] = body
        return body

    def consistent(self) -> list[str]:
        """Problems that would leave Envoy waiting: EDS names not in CDS, RDS not in LDS."""
        problems = [
            f"ClusterLoadAssignment {n!r} has no Cluster"
            for n in self.resources[rs.ENDPOINT]
            if n not in self.resources[rs.CLUSTER]
        ]
        problems += [
            f"RouteConfiguration {n!r} has no Listener"
            for n in self.resources[rs.ROUTE]
            if n not in self.resources[rs.LISTENER]
        ]
        return problems


def build_snapshot(
    topology: Topology,
    health: rs.HealthLookup,
    *,
    version: str,
    cause: Cause,
    previous: Snapshot | None = None,
    dirty_clusters: Iterable[str] | None = None,
) -> Snapshot:
    """The snapshot for `topology` and `health` at `version`.

    With `previous` built from the same topology and `dirty_clusters` given, only those
    clusters' endpoints are rebuilt. Otherwise a cluster whose model equals its model in
    `previous` keeps its Cluster resource, and its ClusterLoadAssignment too when its endpoints'
    health is also the same (a topology edit costs in the clusters it touches, not in all of
    them); everything else is rebuilt, and any resource whose bytes did not change keeps its
    previous version (and bytes).
    """
    same_topology = previous is not None and previous.topology is topology and dirty_clusters is not None
    tables: dict[str, dict[str, Resource]] = {}
    statuses = {c.name: tuple(health(c.name, e.key) for e in c.endpoints) for c in topology.clusters}

    def table(type_url: str, built: Iterable[tuple[str, Message]]) -> dict[str, Resource]:
        old = previous.resources[type_url] if previous is not None else {}
        out: dict[str, Resource] = {}
        for name, message in built:
            fresh = Resource.of(name, message, version)
            prior = old.get(name)
            out[name] = prior if prior is not None and prior.serialized == fresh.serialized else fresh
        return out

    if same_topology:
        assert previous is not None and dirty_clusters is not None
        dirty = set(dirty_clusters)
        for type_url in (rs.CLUSTER, rs.LISTENER, rs.ROUTE):
            tables[type_url] = dict(previous.resources[type_url])
        eds = dict(previous.resources[rs.ENDPOINT])
        eds.update(
            table(
                rs.ENDPOINT,
                ((c.name, rs.build_load_assignment(c, health)) for c in topology.clusters if c.name in dirty),
            )
        )
        tables[rs.ENDPOINT] = eds
        # The clean clusters' load assignments are the previous ones, built from the health then.
        built_from = {**previous.health_inputs, **{name: statuses[name] for name in dirty if name in statuses}}
    else:
        kept = _unchanged_clusters(topology, previous)
        clusters: dict[str, Resource | None] = dict.fromkeys(c.name for c in topology.clusters)  # in order
        assignments = dict(clusters)
        for name, (cluster_resource, health_before, load_assignment) in kept.items():
            clusters[name] = cluster_resource
            if health_before == statuses[name]:
                assignments[name] = load_assignment
        tables[rs.CLUSTER] = _fill(
            clusters,
            table(rs.CLUSTER, ((c.name, rs.build_cluster(c)) for c in topology.clusters if clusters[c.name] is None)),
        )
        tables[rs.ENDPOINT] = _fill(
            assignments,
            table(
                rs.ENDPOINT,
                (
                    (c.name, rs.build_load_assignment(c, health))
                    for c in topology.clusters
                    if assignments[c.name] is None
                ),
            ),
        )
        built_from = statuses
        tables[rs.LISTENER] = table(
            rs.LISTENER,
            [
                *(
                    (ln.name, rs.build_listener(ln, access_log=rs.logs_passive(ln, topology)))
                    for ln in topology.listeners
                ),
                *((svc.name, rs.build_api_listener(svc)) for svc in topology.grpc_services),
            ],
        )
        tables[rs.ROUTE] = table(
            rs.ROUTE,
            [
                *((ln.name, rs.build_route_configuration(ln)) for ln in topology.listeners),
                *((svc.name, rs.build_grpc_route_configuration(svc)) for svc in topology.grpc_services),
            ],
        )

    type_versions: dict[str, str] = {}
    for type_url, entries in tables.items():
        old_entries = previous.resources[type_url] if previous is not None else None
        unchanged = (
            old_entries is not None
            and old_entries.keys() == entries.keys()
            and all(old_entries[n] is r for n, r in entries.items())
        )
        type_versions[type_url] = previous.type_versions[type_url] if unchanged and previous else version

    endpoints = tuple(
        EndpointView(c.name, e.address, e.port, status, e.zone, e.weight)
        for c in topology.clusters
        for e, status in zip(c.endpoints, statuses[c.name], strict=True)
    )
    snapshot = Snapshot(
        version=version,
        cause=cause,
        created=time.time(),
        topology=topology,
        resources=MappingProxyType({t: MappingProxyType(v) for t, v in tables.items()}),
        type_versions=MappingProxyType(type_versions),
        endpoints=endpoints,
        health_inputs=built_from,
    )
    problems = snapshot.consistent()
    if problems:  # by construction this cannot happen; a bug here must not reach Envoy
        raise AssertionError("inconsistent snapshot: " + "; ".join(problems))
    return snapshot


def _unchanged_clusters(
    topology: Topology, previous: Snapshot | None
) -> dict[str, tuple[Resource, tuple[HealthStatus, ...] | None, Resource]]:
    """The clusters of `topology` whose model equals their model in `previous`: name -> (the
    previous Cluster resource, the health its ClusterLoadAssignment was built from, that
    resource). A cluster with raw `envoy` fields is always rebuilt: equal mappings can still
    differ in what they build (1 and True compare equal)."""
    if previous is None:
        return {}
    before = {c.name: c for c in previous.topology.clusters}
    cds, eds = previous.resources[rs.CLUSTER], previous.resources[rs.ENDPOINT]
    out: dict[str, tuple[Resource, tuple[HealthStatus, ...] | None, Resource]] = {}
    for cluster in topology.clusters:
        old = before.get(cluster.name)
        if old is None or cluster.envoy or old.envoy or old != cluster:
            continue
        cluster_resource, load_assignment = cds.get(cluster.name), eds.get(cluster.name)
        if cluster_resource is not None and load_assignment is not None:
            out[cluster.name] = (cluster_resource, previous.health_inputs.get(cluster.name), load_assignment)
    return out


def _fill(kept: dict[str, Resource | None], built: Mapping[str, Resource]) -> dict[str, Resource]:
    """`kept` (in the topology's order) with its gaps filled from `built`."""
    return {name: resource if resource is not None else built[name] for name, resource in kept.items()}


def changed_resources(old: Snapshot | None, new: Snapshot) -> dict[str, list[str]]:
    """Per type, the names whose version differs between two snapshots (added ones included)."""
    out: dict[str, list[str]] = {}
    for type_url, entries in new.resources.items():
        before = old.resources.get(type_url, {}) if old is not None else {}
        names = [n for n, r in entries.items() if n not in before or before[n].version != r.version]
        if names:
            out[type_url] = names
    return out


def find_snapshot(history: Iterable[Snapshot], version: str) -> Snapshot | None:
    """The snapshot of `version` in `history` (newest first for recent versions), or None."""
    for snap in history:
        if snap.version == version:
            return snap
    return None
