"""The main process's copy of every worker's streams, reported through the ordinary `StreamCallbacks`.

Each worker's records (`records.py`) update a `StreamState` here that holds what the worker's
holds (node, subscriptions, versions sent, ACKed and NACKed, send times), and then call the
callbacks with it exactly as an in-process `AdsServer` would: the node registry, metrics,
propagation and NACK groups, CSDS and `/nodes` cannot tell a worker's stream from their own.

The time of the event being applied (an ACK's time in the worker, not when its record arrived)
is `clock()`, which the propagation tracker reads, so batching records costs no accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from controlplane.snapshots.snapshot import Snapshot
from controlplane.xds.delta import DeltaResponse, DeltaStreamState
from controlplane.xds.limits import peer_host
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import Nack, PendingResponse, RequestKind, RequestOutcome, StreamState, TypeState
from controlplane.xds.workers.records import SAME, Record, TypeSync

_KINDS = {kind.value: kind for kind in RequestKind}


class Mirror:
    """Worker streams by stream id, and which worker holds each."""

    def __init__(self, callbacks: StreamCallbacks, find_snapshot: Callable[[str], Snapshot | None]) -> None:
        self.callbacks = callbacks
        self.find_snapshot = find_snapshot
        self.streams: dict[int, StreamState] = {}
        self.owner: dict[int, int] = {}  # stream id -> worker slot
        self._now: float | None = None
        # controlplane.xds.max_streams_per_peer across the workers: each worker refuses a peer's
        # streams past it on its own; a peer spread over several workers is seen only here, and
        # its streams past the limit are handed to `over_limit` (the pool closes them).
        self.peer_limit = 0
        self.over_limit: Callable[[int, str], None] | None = None
        self.per_peer: dict[str, int] = {}

    def clock(self) -> float:
        """When the event being applied happened in its worker (else now)."""
        return self._now if self._now is not None else time.time()

    def apply(self, slot: int, records: Iterable[Record]) -> None:
        """Apply one batch of records from the worker in `slot`."""
        for record in records:
            try:
                getattr(self, "_" + record[0])(slot, record)
            finally:
                self._now = None

    def drop(self, slot: int) -> int:
        """Close every stream of the worker in `slot` (it is gone); how many there were."""
        gone = [sid for sid, owner in self.owner.items() if owner == slot]
        for sid in gone:
            self._closed(slot, ("closed", sid))
        return len(gone)

    def of(self, slot: int) -> int:
        return sum(1 for owner in self.owner.values() if owner == slot)

    # ------------------------------------------------------------------ records

    def _open(self, slot: int, record: Record) -> None:
        (_, sid, protocol, peer, opened, node_id, node_key, node_cluster, locality, zone, agent, types) = record
        stream: StreamState = (DeltaStreamState if protocol == "delta" else StreamState)(sid, peer=peer)
        stream.opened = opened
        stream.node_id = node_id
        stream.node_key = node_key
        stream.node_cluster = node_cluster
        stream.node_locality = locality
        stream.node_zone = zone
        stream.user_agent = agent
        for sync in types:
            _apply(stream, sync)
        self.streams[sid] = stream
        self.owner[sid] = slot
        self._now = opened
        self.callbacks.on_stream_open(stream)
        host = peer_host(peer)
        held = self.per_peer.get(host, 0)
        self.per_peer[host] = held + 1
        if self.peer_limit and held >= self.peer_limit and self.over_limit is not None:
            self.over_limit(
                sid,
                f"{host} already holds {held} ADS streams across the xDS workers: "
                f"controlplane.xds.max_streams_per_peer is {self.peer_limit}",
            )

    def _request(self, slot: int, record: Record) -> None:
        _, sid, kind, type_url, version, nonce, error, sent_at, sync = record
        stream = self.streams.get(sid)
        if stream is None:
            return
        ts = _apply(stream, sync)
        outcome = RequestOutcome(_KINDS[kind], type_url, version, nonce, error, sent_at)
        if outcome.kind is RequestKind.ACK:
            self._now = ts.acked_at
        elif outcome.kind is RequestKind.NACK and ts.last_nack is not None:
            self._now = ts.last_nack.time
        self.callbacks.on_request(stream, outcome)

    def _response(self, slot: int, record: Record) -> None:
        _, sid, type_url, version, names, nonce, removed, snapshot_version, sync = record
        stream = self.streams.get(sid)
        if stream is None:
            return
        ts = _apply(stream, sync)
        snapshot = self.find_snapshot(snapshot_version)
        if snapshot is None:  # older than the history kept: the views read the stream's state only
            return
        response = (
            PendingResponse(type_url, version, names, nonce)
            if removed is None
            else DeltaResponse(type_url, version, names, nonce, removed)
        )
        self._now = ts.sent_at
        self.callbacks.on_response(stream, response, snapshot)

    def _closed(self, slot: int, record: Record) -> None:
        sid = record[1]
        stream = self.streams.pop(sid, None)
        self.owner.pop(sid, None)
        if stream is not None:
            host = peer_host(stream.peer)
            held = self.per_peer.pop(host, 0) - 1
            if held > 0:
                self.per_peer[host] = held
            self.callbacks.on_stream_closed(stream)


def _apply(stream: StreamState, sync: TypeSync) -> TypeState:
    (type_url, wildcard, names, sent_version, sent_names, last_nonce, sent_at, awaiting, acked_version, acked_at,
     nack, sent) = sync  # fmt: skip
    ts = stream.types.get(type_url)
    if ts is None:
        ts = stream.types[type_url] = TypeState(type_url)
    ts.wildcard = wildcard
    if names is not SAME:
        ts.names = set(names)
    ts.sent_version = sent_version
    if sent_names is not SAME:
        ts.sent_names = sent_names
    ts.last_nonce = last_nonce
    ts.sent_at = sent_at
    ts.awaiting_ack = awaiting
    ts.acked_version = acked_version
    ts.acked_at = acked_at
    ts.last_nack = None if nack is None else _nack(ts.last_nack, nack)
    if sent is not SAME:
        updates, removals = sent
        ts.sent.update(updates)
        for name in removals:
            ts.sent.pop(name, None)
    return ts


def _nack(last: Nack | None, nack: tuple[Any, ...]) -> Nack:
    if last is not None and (last.version, last.error, last.time) == nack:
        return last
    return Nack(*nack)
