"""Per-stream delta (incremental) xDS bookkeeping: subscriptions, resource versions, removals.

`DeltaStreamState` is the `StreamState` of a `DeltaAggregatedResources` stream: the server,
the callbacks (node records, propagation, metrics, NACKs), CSDS, the delay model and the
watchdog see it exactly as they see a state-of-the-world stream. What differs is what is due:
only the resources whose version the node does not hold, and the names that went away.

Per type it keeps what the node holds (`TypeState.sent`: name -> the snapshot version of the
resource sent, the same values as a SotW stream) and the names it was told do not exist. The
wire version of a resource is `Resource.delta_version`, a digest of its bytes, so a node that
reconnects, even to a restarted control plane, and lists its `initial_resource_versions` is
sent only what differs.

Protocol rules, from https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol
("Incremental xDS"):
- CDS and LDS: a first request that subscribes nothing is a wildcard subscription (legacy
  wildcard); `*` subscribes to everything explicitly and may sit beside names. The legacy
  wildcard ends when the node subscribes to a name of its own.
- A subscribed name that does not exist is answered in `removed_resources` (so Envoy does not
  wait for its initial fetch timeout), and the resource is sent once it appears.
- Subscribing to a name again asks for it again, even if the node holds it.
- A request with `response_nonce` answers that response: an ACK, or a NACK with
  `error_detail`. The rejected resources are not sent again until they change. A nonce that is
  not the last one sent is stale; its subscription changes still apply.
- One response per type is in flight; the next waits for the ACK or NACK.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.errors import ProtocolError
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Resource, Snapshot
from controlplane.xds.stream import (
    SUPPORTED_TYPES,
    WILDCARD,
    Nack,
    PendingResponse,
    RequestKind,
    RequestOutcome,
    StreamState,
    TypeState,
)


@dataclass(frozen=True, slots=True)
class DeltaResponse(PendingResponse):
    """A due delta response: `names` to send, `removed` to announce gone."""

    removed: tuple[str, ...] = ()


@dataclass(slots=True)
class DeltaTypeState(TypeState):
    """One type URL on one delta stream."""

    legacy_wildcard: bool = False  # wildcard because the first request named nothing
    absent: set[str] = field(default_factory=set)  # subscribed names the node was told do not exist
    # The node's initial_resource_versions, resolved against the next snapshot (name -> digest).
    initial: dict[str, str] | None = None
    # The snapshot this type was last reconciled against; None until a full pass is due (the
    # first, after initial versions, or the wildcard changed).
    synced: Snapshot | None = None
    recheck: set[str] = field(default_factory=set)  # names (un)subscribed since: checked on the next pass

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaStreamState(StreamState):
    """Everything one delta ADS stream knows about its node and what that node holds."""

    protocol = "delta"

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> RequestOutcome:
        """Record one DeltaDiscoveryRequest and classify it; ProtocolError when it breaks the protocol."""
        self.accept_node(request)
        type_url = request.type_url
        if not type_url:
            raise ProtocolError("type_url is empty: ADS needs it on every request")
        nonce = request.response_nonce
        if type_url not in SUPPORTED_TYPES:
            return RequestOutcome(RequestKind.UNSUPPORTED, type_url, "", nonce)
        ts = self.types.get(type_url)
        if ts is None:
            ts = DeltaTypeState(type_url)
            self.types[type_url] = ts
            subscribe = list(request.resource_names_subscribe)
            if type_url in rs.FULL_STATE_TYPES and not subscribe:
                ts.wildcard = ts.legacy_wildcard = True
            self._apply_subscriptions(ts, subscribe, list(request.resource_names_unsubscribe))
            # Versions the node holds from an earlier stream: nothing of them is resent unchanged.
            ts.initial = dict(request.initial_resource_versions)
            self.dirty = True
            return RequestOutcome(RequestKind.SUBSCRIBE, type_url, "", nonce)
        assert isinstance(ts, DeltaTypeState)
        outcome = RequestOutcome(RequestKind.SUBSCRIBE, type_url, ts.acked_version or "", nonce)
        if nonce:
            if nonce != ts.last_nonce or not ts.awaiting_ack:
                outcome = RequestOutcome(RequestKind.STALE, type_url, ts.acked_version or "", nonce)
            else:
                ts.awaiting_ack = False
                if type_url in self._held:
                    self.dirty = True
                now = time.time()
                if request.HasField("error_detail"):
                    error = request.error_detail.message or f"code {request.error_detail.code}"
                    ts.last_nack = Nack(version=ts.sent_version or "", error=error, time=now)
                    # What the node keeps: the version it ACKed before.
                    kept = ts.acked_version or ""
                    outcome = RequestOutcome(RequestKind.NACK, type_url, kept, nonce, error, ts.sent_at)
                else:
                    # A delta ACK names no version: it accepts the response of its nonce, which
                    # carried the type version `sent_version` as system_version_info.
                    ts.acked_version = ts.sent_version
                    ts.acked_at = now
                    outcome = RequestOutcome(RequestKind.ACK, type_url, ts.sent_version or "", nonce, None, ts.sent_at)
        if request.resource_names_subscribe or request.resource_names_unsubscribe:
            self._apply_subscriptions(
                ts, list(request.resource_names_subscribe), list(request.resource_names_unsubscribe)
            )
            self.dirty = True
        return outcome

    def _apply_subscriptions(self, ts: DeltaTypeState, subscribe: list[str], unsubscribe: list[str]) -> None:
        # Cost in the names changed, not in the names held: a node with 1,000 clusters that
        # subscribes one more must not cost a pass over the other 1,000.
        was_wildcard = ts.wildcard
        for name in subscribe:
            if name == WILDCARD:
                ts.wildcard, ts.legacy_wildcard = True, False
                continue
            if ts.legacy_wildcard:  # a name of its own ends the legacy wildcard
                ts.wildcard = ts.legacy_wildcard = False
            ts.names.add(name)
            ts.sent.pop(name, None)  # (re)subscribed: send it even if the node holds it
            ts.absent.discard(name)
            ts.recheck.add(name)
        for name in unsubscribe:
            if name == WILDCARD:
                ts.wildcard = ts.legacy_wildcard = False
            else:
                ts.names.discard(name)
                ts.absent.discard(name)
                if not ts.wildcard:
                    ts.sent.pop(name, None)
        if ts.wildcard != was_wildcard:
            if not ts.wildcard:
                for name in [n for n in ts.sent if n not in ts.names]:
                    del ts.sent[name]
            ts.synced = None

    # ------------------------------------------------------------------ responses

    def response_body(self, snapshot: Snapshot, pending: PendingResponse) -> bytes:
        removed = pending.removed if isinstance(pending, DeltaResponse) else ()
        return snapshot.delta_response_body(pending.type_url, pending.names, removed)

    def due(self, snapshot: Snapshot) -> list[PendingResponse]:
        """Delta responses to send now, in ADS order, and mark them sent."""
        self.dirty = False
        self.checked_snapshot = snapshot
        self._held.clear()
        out: list[PendingResponse] = []
        for type_url in rs.ADS_ORDER:
            ts = self.types.get(type_url)
            if ts is None:
                continue
            assert isinstance(ts, DeltaTypeState)
            if ts.awaiting_ack:
                # As StreamState.due: another look after the ACK only if this snapshot may hold
                # something the response in flight did not (names to recheck, a newer type version).
                if (
                    snapshot.type_versions[type_url] != ts.sent_version
                    or type_url == rs.LISTENER
                    or ts.recheck
                    or ts.initial is not None
                    or ts.synced is None
                ):
                    self._held.add(type_url)
                continue
            to_send, removed = self._changes(ts, snapshot)
            type_version = snapshot.type_versions[type_url]
            if not to_send and not removed and ts.sent_version is not None:
                # Else an empty response: the first one of a type answers the subscription (Envoy
                # waits for it; a reconnected node may hold everything already), and a full-state
                # type moves to a new version even when nothing in it concerns this node (a
                # listener of another service), so that the node's ACK says it has seen the
                # latest, as a SotW stream's does.
                if type_url not in rs.FULL_STATE_TYPES or ts.sent_version == type_version:
                    continue
            nonce = self.next_nonce()
            ts.last_nonce = nonce
            ts.awaiting_ack = True
            ts.sent_at = time.time()
            ts.sent_version = type_version
            ts.sent_names = to_send
            table = snapshot.resources[type_url]
            updated = [n for n in to_send if n in ts.sent]
            ts.sent.update((n, table[n].version) for n in to_send)
            if type_url == rs.CLUSTER and updated and (eds := self.types.get(rs.ENDPOINT)) is not None:
                # Envoy re-creates an updated cluster and the new one warms until it gets its
                # ClusterLoadAssignment; the name stays subscribed, so no request asks for it.
                # Send it again right behind the cluster (ADS order: EDS after CDS).
                assert isinstance(eds, DeltaTypeState)
                for name in updated:
                    if eds.sent.pop(name, None) is not None:
                        eds.recheck.add(name)
            out.append(DeltaResponse(type_url, type_version, to_send, nonce, removed))
        return out

    def _changes(self, ts: DeltaTypeState, snapshot: Snapshot) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What the node lacks of `ts`'s type in `snapshot`, and what it holds that is gone."""
        type_url = ts.type_url
        table = snapshot.resources[type_url]
        if type_url == rs.LISTENER:
            mine = set(snapshot.listener_names_for(self.node_cluster))
            available: Mapping[str, Resource] = {n: r for n, r in table.items() if n in mine}
        else:
            available = table
        if ts.initial is not None:
            for name, digest in ts.initial.items():
                if not ts.wants(name):
                    continue
                current = available.get(name)
                if current is None:
                    ts.sent[name] = ""  # held by the node, gone here: announced below
                elif current.delta_version == digest:
                    ts.sent[name] = current.version
            ts.initial = None
            ts.synced = None
        sent = ts.sent
        removed: list[str] = []
        if ts.synced is not None and type_url != rs.LISTENER:
            # Since the last pass, only what changed between the two snapshots (computed once per
            # pair and shared by every stream) and the names (un)subscribed can differ.
            candidates = _changed_names(ts.synced, snapshot, type_url)
            if ts.recheck:
                candidates = list(dict.fromkeys([*candidates, *ts.recheck]))
        else:
            candidates = list(available)
            candidates += [n for n in sent if n not in available]
            if not ts.wildcard:
                candidates += [n for n in ts.names if n not in available and n not in sent]
        ts.synced = snapshot
        ts.recheck.clear()
        to_send: list[str] = []
        for name in candidates:
            current = available.get(name)
            if current is not None:
                if (ts.wildcard or name in ts.names) and sent.get(name) != current.version:
                    to_send.append(name)
                    ts.absent.discard(name)
            elif name in sent:
                del sent[name]
                removed.append(name)
                if name in ts.names:
                    ts.absent.add(name)
            elif name in ts.names and name not in ts.absent:
                removed.append(name)
                ts.absent.add(name)
        return tuple(to_send), tuple(removed)


_Diff = tuple["weakref.ref[Snapshot]", list[str]]
_diffs: weakref.WeakKeyDictionary[Snapshot, dict[tuple[int, str], _Diff]] = weakref.WeakKeyDictionary()


def _changed_names(old: Snapshot, new: Snapshot, type_url: str) -> list[str]:
    """Names of `type_url` whose resource is not the same object in both snapshots (added, changed, gone)."""
    if old is new:
        return []
    per_new = _diffs.get(new)
    if per_new is None:
        per_new = _diffs[new] = {}
    key = (id(old), type_url)
    entry = per_new.get(key)
    if entry is not None and entry[0]() is old:  # (an id can be reused once its snapshot is gone)
        return entry[1]
    before, after = old.resources[type_url], new.resources[type_url]
    names: list[str] = []
    if before is not after:
        names = [n for n, r in after.items() if before.get(n) is not r]
        names += [n for n in before if n not in after]
    if len(per_new) > 64:
        per_new.clear()
    per_new[key] = (weakref.ref(old), names)
    return names
