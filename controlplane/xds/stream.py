"""Per-stream xDS bookkeeping: subscriptions, nonces, ACK/NACK, and what is due to send.

Plain synchronous state, one `StreamState` per ADS stream. The server feeds it every
DiscoveryRequest (`on_request`) and asks it, whenever a request arrives or a new snapshot is
published, which responses are due (`due`). It never touches gRPC; the server never decides
what to send.

Protocol rules, from https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol:
- A request whose `response_nonce` is not the last nonce sent for its type is stale: ignored.
- A request carrying `error_detail` is a NACK; the rejected version is not sent again.
- One response per type is in flight at a time; the next waits for its ACK or NACK.
- Cluster and Listener responses carry every resource; others carry what changed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.errors import ProtocolError
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Snapshot

WILDCARD = "*"
SUPPORTED_TYPES = frozenset(rs.ADS_ORDER)


def _user_agent(node: base_pb2.Node) -> str:
    """The node's user agent as shown: Envoy's from its build version ("envoy 1.40.0"), a gRPC
    client's from its `user_agent_version` string ("gRPC C-core linux Python ... 1.85.3")."""
    if node.HasField("user_agent_build_version"):
        v = node.user_agent_build_version.version
        return f"{node.user_agent_name} {v.major_number}.{v.minor_number}.{v.patch}"
    return f"{node.user_agent_name} {node.user_agent_version}".strip()


class RequestKind(enum.Enum):
    SUBSCRIBE = "subscribe"  # a request that answers no response of ours (the first, or a new type)
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # answers a response that a newer one has replaced: ignored
    UNSUPPORTED = "unsupported"  # a type this server does not serve: ignored


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    kind: RequestKind
    type_url: str
    version: str  # version_info of the request: what the node has now
    nonce: str
    error: str | None = None
    sent_at: float | None = None  # when the answered response was sent


@dataclass(frozen=True, slots=True)
class Nack:
    version: str  # the version the node rejected
    error: str
    time: float


@dataclass(frozen=True, slots=True)
class PendingResponse:
    type_url: str
    version: str
    names: tuple[str, ...]
    nonce: str


@dataclass(slots=True)
class TypeState:
    """One type URL on one stream."""

    type_url: str
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # resource name -> version sent
    sent_version: str | None = None  # type version of the last response
    sent_names: tuple[str, ...] | None = None  # resources of the last response (full-state types)
    last_nonce: str | None = None
    sent_at: float | None = None
    awaiting_ack: bool = False
    acked_version: str | None = None
    acked_at: float | None = None
    last_nack: Nack | None = None
    resend_all: bool = False

    def subscribed(self, available: list[str]) -> list[str]:
        return available if self.wildcard else [n for n in available if n in self.names]


class StreamState:
    """Everything one ADS stream knows about its node and what it has sent."""

    protocol = "sotw"  # state of the world; controlplane.xds.delta.DeltaStreamState says "delta"

    def __init__(self, stream_id: int, *, peer: str = "") -> None:
        self.stream_id = stream_id
        self.peer = peer
        self.opened = time.time()
        self.node_id: str | None = None
        # What the registry and views key this stream's node by: node.id, except for gRPC clients,
        # which open one ADS stream per channel target (grpcio keeps an xDS client per target),
        # all with the process's one node.id: "ID@TARGET" keeps them apart. TARGET is the name
        # the stream asks LDS for, which may not be its first request (a reconnecting gRPC client
        # asks CDS first), so a gRPC stream has no key until its LDS request: see `identified`.
        self.node_key = ""
        self._grpc = False
        self.node_cluster = ""
        self.node_locality = ""
        self.node_zone = ""  # node.locality.zone, which the propagation model matches on
        self.user_agent = ""
        self.types: dict[str, TypeState] = {}
        self._nonce = 0
        # Whether a request may have made a response due since `due()` last ran, against which
        # snapshot it ran, and which types it held back while awaiting their ACK: together they
        # let a plain ACK pass without waking the stream's writer (the common case in a push).
        self.dirty = True
        self.checked_snapshot: Snapshot | None = None
        self._held: set[str] = set()

    # ------------------------------------------------------------------ requests

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> RequestOutcome:
        """Record one request and classify it; raises ProtocolError when it breaks the protocol."""
        self.accept_node(request)
        type_url = request.type_url
        if not type_url:
            raise ProtocolError("type_url is empty: ADS needs it on every request")
        if not self.node_key and type_url == rs.LISTENER and self._grpc:
            names = sorted(n for n in request.resource_names if n != WILDCARD)
            self.node_key = f"{self.node_id}@{names[0]}" if names else (self.node_id or "")
        nonce = request.response_nonce
        if type_url not in SUPPORTED_TYPES:
            return RequestOutcome(RequestKind.UNSUPPORTED, type_url, request.version_info, nonce)
        ts = self.types.get(type_url)
        if ts is None:
            ts = self.types[type_url] = TypeState(type_url)
            kind = RequestKind.SUBSCRIBE
            self.dirty = True
            self._subscribe(ts, request, first=True)
            return RequestOutcome(kind, type_url, request.version_info, nonce)
        if nonce and nonce != ts.last_nonce:
            return RequestOutcome(RequestKind.STALE, type_url, request.version_info, nonce)
        outcome = RequestOutcome(RequestKind.SUBSCRIBE, type_url, request.version_info, nonce)
        if nonce:  # answers our latest response
            ts.awaiting_ack = False
            if type_url in self._held:
                self.dirty = True
            now = time.time()
            if request.HasField("error_detail"):
                error = request.error_detail.message or f"code {request.error_detail.code}"
                ts.last_nack = Nack(version=ts.sent_version or "", error=error, time=now)
                outcome = RequestOutcome(RequestKind.NACK, type_url, request.version_info, nonce, error, ts.sent_at)
            else:
                ts.acked_version = request.version_info
                ts.acked_at = now
                outcome = RequestOutcome(RequestKind.ACK, type_url, request.version_info, nonce, None, ts.sent_at)
        self._subscribe(ts, request, first=False)
        if type_url == rs.ENDPOINT and ts.resend_all and outcome.kind is not RequestKind.NACK:
            # Envoy re-requests EDS after a CDS update with the ACKed nonce and the same names:
            # a re-created cluster waits for an answer (else it stays warming for
            # initial_fetch_timeout, 15 s). So the first EDS request after CDS gets everything.
            # Not a NACK: that would answer it with the very version it rejected.
            ts.resend_all = False
            ts.sent.clear()
            self.dirty = True
        return outcome

    def accept_node(self, request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest) -> None:
        """Take the node from the stream's first request; ProtocolError if it is missing or changes."""
        if request.HasField("node"):
            if not request.node.id:
                raise ProtocolError("node.id is empty: start Envoy with --service-node or node.id")
            if self.node_id is None:
                self.node_id = request.node.id
                self.node_cluster = request.node.cluster
                loc = request.node.locality
                self.node_zone = loc.zone
                self.node_locality = "/".join(p for p in (loc.region, loc.zone, loc.sub_zone) if p)
                self.user_agent = _user_agent(request.node)
                # gRPC's client opens one stream per channel target under one node.id: its key
                # waits for its LDS request (see `identified`); an Envoy's key is its node.id.
                self._grpc = request.node.user_agent_name.startswith("gRPC")
                if not self._grpc:
                    self.node_key = self.node_id
            elif request.node.id != self.node_id:
                raise ProtocolError(f"node.id changed on one stream: {self.node_id!r} -> {request.node.id!r}")
        elif self.node_id is None:
            raise ProtocolError("the first request on a stream must carry node")

    def _subscribe(self, ts: TypeState, request: discovery_pb2.DiscoveryRequest, *, first: bool) -> None:
        names = set(request.resource_names)
        full_state = ts.type_url in rs.FULL_STATE_TYPES
        # Legacy wildcard: an empty list on the first CDS/LDS request means "everything", and
        # keeps meaning it on that stream (xds_protocol, "How the client specifies what
        # resources to return").
        wildcard = WILDCARD in names or (full_state and not names and (first or ts.wildcard))
        names.discard(WILDCARD)
        if wildcard != ts.wildcard or (not wildcard and names != ts.names):
            if not wildcard:
                for gone in ts.names - names:
                    ts.sent.pop(gone, None)
                for new in names - ts.names:
                    ts.sent.pop(new, None)  # newly subscribed: send even if unchanged
            ts.wildcard, ts.names = wildcard, names
            ts.sent_names = None
            self.dirty = True

    @property
    def identified(self) -> bool:
        """Whether `node_key` is known: the stream may be opened, served and shown."""
        return bool(self.node_key)

    # ------------------------------------------------------------------ responses

    def response_body(self, snapshot: Snapshot, pending: PendingResponse) -> bytes:
        """The shared bytes of a due response, all but its nonce."""
        return snapshot.response_body(pending.type_url, pending.names)

    def next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def stamp_sent(self, sent: list[PendingResponse], at: float | None) -> None:
        """When responses `due()` returned really leave: None while a modelled delay holds them."""
        for pending in sent:
            self.types[pending.type_url].sent_at = at

    def needs_due(self, current: Snapshot | None) -> bool:
        """Whether `due()` could find something to send now that it did not last time."""
        return self.dirty or current is not self.checked_snapshot

    def due(self, snapshot: Snapshot) -> list[PendingResponse]:
        """Responses to send now, in ADS order, and mark them sent."""
        self.dirty = False
        self.checked_snapshot = snapshot
        self._held.clear()
        out: list[PendingResponse] = []
        for type_url in rs.ADS_ORDER:
            ts = self.types.get(type_url)
            if ts is None:
                continue
            type_version = snapshot.type_versions[type_url]
            if ts.awaiting_ack:
                # Its ACK needs another look only if the response in flight is older than this
                # snapshot's resources of the type, or the subscription changed since it was
                # built (a request with no nonce yet: `sent_names` is cleared; EDS and RDS keep
                # none, so they are always looked at again), or the node's listeners may differ
                # (a listener's `nodes` is not in its bytes).
                if type_version != ts.sent_version or ts.sent_names is None or type_url == rs.LISTENER:
                    self._held.add(type_url)
                continue
            table = snapshot.resources[type_url]
            if type_url == rs.LISTENER:
                available = list(snapshot.listener_names_for(self.node_cluster, wildcard=ts.wildcard))
            else:
                available = list(table)
            names = tuple(ts.subscribed(available))
            if type_url in rs.FULL_STATE_TYPES:
                # A new type version is sent even when this node's (filtered) listeners did not
                # change, so that every node's ACKed version says it has seen the latest.
                if ts.sent_version == type_version and ts.sent_names == names:
                    continue
                to_send = names
            else:
                to_send = tuple(n for n in names if ts.sent.get(n) != table[n].version)
                if not to_send:
                    continue
            nonce = self.next_nonce()
            ts.last_nonce = nonce
            ts.awaiting_ack = True
            ts.sent_at = time.time()
            ts.sent_version = type_version
            if type_url in rs.FULL_STATE_TYPES:
                ts.sent_names = names
                ts.sent = {n: table[n].version for n in names}
            else:
                ts.sent.update((n, table[n].version) for n in to_send)
            if type_url == rs.CLUSTER and (eds := self.types.get(rs.ENDPOINT)) is not None:
                eds.resend_all = True
            out.append(PendingResponse(type_url, type_version, to_send, nonce))
        return out
