"""Which node sees which truth: every connected node's versions sent, ACKed and NACKed."""

from __future__ import annotations

import time
from typing import Any, Protocol

from controlplane.events import EventLog
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Snapshot
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import PendingResponse, RequestKind, RequestOutcome, StreamState, TypeState


class NodeStreams(Protocol):
    """The connected nodes' current streams (the latest stream of a node wins)."""

    def streams(self) -> list[StreamState]: ...

    def get(self, node_key: str) -> StreamState | None: ...


class NodeRegistry(StreamCallbacks):
    """Streams by node id (the latest stream wins) and the NACKs they reported."""

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self._streams: dict[str, StreamState] = {}
        self.disconnected: dict[str, float] = {}
        self.acks = 0
        self.nacks = 0
        self.responses = 0

    def on_stream_open(self, stream: StreamState) -> None:
        assert stream.node_id is not None
        previous = self._streams.get(stream.node_key)
        self._streams[stream.node_key] = stream
        self.disconnected.pop(stream.node_key, None)
        self.events.record(
            "node",
            f"node {stream.node_key} connected from {stream.peer}",
            node=stream.node_key,
            node_cluster=stream.node_cluster,
            peer=stream.peer,
            replaced_stream=previous.stream_id if previous is not None else None,
        )

    def on_stream_closed(self, stream: StreamState) -> None:
        assert stream.node_id is not None
        if self._streams.get(stream.node_key) is stream:
            del self._streams[stream.node_key]
            self.disconnected[stream.node_key] = time.time()
            self.events.record("node", f"node {stream.node_key} disconnected", node=stream.node_key)

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        if outcome.kind is RequestKind.ACK:
            self.acks += 1
        elif outcome.kind is RequestKind.NACK:
            self.nacks += 1
            self.events.record(
                "nack",
                f"node {stream.node_key} rejected {rs.SHORT_NAMES[outcome.type_url]} version "
                f"{stream.types[outcome.type_url].sent_version}: {outcome.error}",
                node=stream.node_key,
                type_url=outcome.type_url,
                rejected_version=stream.types[outcome.type_url].sent_version,
                kept_version=outcome.version,
                error=outcome.error,
            )

    def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
        self.responses += 1

    def streams(self) -> list[StreamState]:
        return list(self._streams.values())

    def get(self, node_key: str) -> StreamState | None:
        """The stream of a node by `StreamState.node_key` (its node.id, for Envoys)."""
        return self._streams.get(node_key)


def type_view(ts: TypeState) -> dict[str, Any]:
    nack = ts.last_nack
    return {
        "subscribed": "*" if ts.wildcard else sorted(ts.names),
        "version_sent": ts.sent_version,
        "nonce": ts.last_nonce,
        "sent_at": ts.sent_at,
        "awaiting_ack": ts.awaiting_ack,
        "version_acked": ts.acked_version,
        "acked_at": ts.acked_at,
        "last_nack": None if nack is None else {"version": nack.version, "error": nack.error, "time": nack.time},
    }


def _type_up_to_date(ts: TypeState, snapshot: Snapshot) -> bool:
    """Whether the node ACKed what the snapshot says for everything it subscribes to.

    CDS and LDS (and wildcards) carry a new type version to every node. EDS and RDS by name do
    not: a gRPC client watching one cluster is not sent, and is not behind on, another's change.
    """
    if ts.type_url in rs.FULL_STATE_TYPES or ts.wildcard:
        return ts.acked_version == snapshot.type_versions[ts.type_url]
    table = snapshot.resources[ts.type_url]
    return (
        not ts.awaiting_ack
        and ts.acked_version == ts.sent_version
        and all(ts.sent.get(name) == table[name].version for name in ts.names if name in table)
    )


def node_view(stream: StreamState, snapshot: Snapshot | None) -> dict[str, Any]:
    types = {rs.SHORT_NAMES.get(t, t): type_view(ts) for t, ts in stream.types.items()}
    up_to_date = snapshot is not None and all(
        _type_up_to_date(ts, snapshot) for t, ts in stream.types.items() if t in snapshot.type_versions
    )
    return {
        "id": stream.node_key,
        "node_id": stream.node_id,
        "protocol": stream.protocol,
        "cluster": stream.node_cluster,
        "locality": stream.node_locality,
        "user_agent": stream.user_agent.strip(),
        "peer": stream.peer,
        "stream_id": stream.stream_id,
        "connected_at": stream.opened,
        "up_to_date": up_to_date,
        "types": types,
    }
