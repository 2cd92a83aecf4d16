"""A worker's stream records: what its `AdsServer` callbacks saw, as plain tuples for the main process.

Each record names the stream (its id is unique across every worker) and carries the state of
the one type it touched after the event (`TypeSync`), so the main process's copy (`mirror.py`)
reads exactly what the worker's `StreamState` holds. Subscriptions and the resources sent travel
only when they changed since that type's last record (a shadow per stream and type), so an ACK
is a record of a dozen scalars.

    ("open", stream_id, protocol, peer, opened, node_id, node_key, node_cluster, node_locality,
     node_zone, user_agent, [TypeSync, ...])
    ("request", stream_id, kind, type_url, version, nonce, error, sent_at, TypeSync)
    ("response", stream_id, type_url, version, names, nonce, removed, snapshot_version, TypeSync)
    ("closed", stream_id)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.snapshots.snapshot import Snapshot
from controlplane.xds.delta import DeltaResponse
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import PendingResponse, RequestOutcome, StreamState, TypeState

# A field that did not change since the type's last record.
SAME: Any = ...

Record = tuple[Any, ...]
# (type_url, wildcard, names | SAME, sent_version, sent_names | SAME, last_nonce, sent_at,
#  awaiting_ack, acked_version, acked_at, (nack version, error, time) | None,
#  (sent updates, sent removals) | SAME)
TypeSync = tuple[Any, ...]


@dataclass(slots=True)
class _Shadow:
    """What the main process was last told of one type on one stream."""

    names: frozenset[str] = frozenset()
    sent: dict[str, str] = field(default_factory=dict)
    sent_names: tuple[str, ...] | None = None


class Recorder(StreamCallbacks):
    """The worker's `StreamCallbacks`: every event of an opened stream becomes one record."""

    def __init__(self, emit: Callable[[Record], None]) -> None:
        self.emit = emit
        self._shadows: dict[int, dict[str, _Shadow]] = {}

    def on_stream_open(self, stream: StreamState) -> None:
        shadows = self._shadows[stream.stream_id] = {}
        types = [_sync(ts, shadows) for ts in stream.types.values()]
        self.emit(
            (
                "open",
                stream.stream_id,
                stream.protocol,
                stream.peer,
                stream.opened,
                stream.node_id,
                stream.node_key,
                stream.node_cluster,
                stream.node_locality,
                stream.node_zone,
                stream.user_agent,
                types,
            )
        )

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        shadows = self._shadows.get(stream.stream_id)
        ts = stream.types.get(outcome.type_url)
        if shadows is None or ts is None:  # before the stream opened (its open carries the types), or unsupported
            return
        self.emit(
            (
                "request",
                stream.stream_id,
                outcome.kind.value,
                outcome.type_url,
                outcome.version,
                outcome.nonce,
                outcome.error,
                outcome.sent_at,
                _sync(ts, shadows),
            )
        )

    def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
        shadows = self._shadows.get(stream.stream_id)
        if shadows is None:
            return
        removed = response.removed if isinstance(response, DeltaResponse) else None
        self.emit(
            (
                "response",
                stream.stream_id,
                response.type_url,
                response.version,
                response.names,
                response.nonce,
                removed,
                snapshot.version,
                _sync(stream.types[response.type_url], shadows),
            )
        )

    def on_stream_closed(self, stream: StreamState) -> None:
        if self._shadows.pop(stream.stream_id, None) is not None:
            self.emit(("closed", stream.stream_id))


def _sync(ts: TypeState, shadows: dict[str, _Shadow]) -> TypeSync:
    shadow = shadows.get(ts.type_url)
    if shadow is None:
        shadow = shadows[ts.type_url] = _Shadow()
    names: Any = SAME
    if ts.names != shadow.names:
        names = shadow.names = frozenset(ts.names)
    sent_names: Any = SAME
    if ts.sent_names is not shadow.sent_names:
        sent_names = shadow.sent_names = ts.sent_names
    sent: Any = SAME
    if ts.sent != shadow.sent:
        before = shadow.sent
        sent = ({n: v for n, v in ts.sent.items() if before.get(n) != v}, [n for n in before if n not in ts.sent])
        shadow.sent = dict(ts.sent)
    nack = ts.last_nack
    return (
        ts.type_url,
        ts.wildcard,
        names,
        ts.sent_version,
        sent_names,
        ts.last_nonce,
        ts.sent_at,
        ts.awaiting_ack,
        ts.acked_version,
        ts.acked_at,
        None if nack is None else (nack.version, nack.error, nack.time),
        sent,
    )
