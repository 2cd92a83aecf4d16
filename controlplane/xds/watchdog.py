"""The stuck-stream watchdog: close ADS streams whose node left a response unanswered too long.

A node that stops reading (a wedged Envoy, a half-open connection) holds its stream's buffers and
never sees a newer version; closing the stream makes it reconnect and receive the current one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from controlplane.events import EventSink
from controlplane.snapshots import resources as rs
from controlplane.xds.stream import StreamState


class StreamCloser(Protocol):
    """The streams served and a way to close one: an `AdsServer`, or the xDS workers (workers/pool.py)."""

    @property
    def streams(self) -> Mapping[int, StreamState]: ...

    def close_stream(self, stream_id: int, reason: str) -> bool: ...


class Watchdog:
    """Closes stuck streams of one `AdsServer` (or of the xDS workers), counting and recording each."""

    def __init__(self, ads: StreamCloser, events: EventSink, registry: CollectorRegistry) -> None:
        self.ads = ads
        self.events = events
        self.closed = Counter(
            "healthplane_xds_stuck_streams_closed",
            "ADS streams closed because a response stayed unanswered past stuck_stream_timeout.",
            registry=registry,
        )

    def close_stuck_streams(self, limit: float, now: float | None = None) -> list[int]:
        """Close streams with a response unanswered past `limit` seconds; their stream ids."""
        now = time.time() if now is None else now
        closed = []
        for stream in list(self.ads.streams.values()):
            waiting = [ts for ts in stream.types.values() if ts.awaiting_ack and ts.sent_at is not None]
            if not waiting:
                continue
            oldest = min(waiting, key=lambda ts: ts.sent_at or now)
            age = now - (oldest.sent_at or now)
            if age <= limit:  # the common case, every stream in the middle of a push: nothing to format
                continue
            why = (
                f"{rs.SHORT_NAMES.get(oldest.type_url, oldest.type_url)} version {oldest.sent_version} "
                f"unanswered for {age:.0f}s (stuck_stream_timeout {limit:g}s)"
            )
            if not self.ads.close_stream(stream.stream_id, f"stream closed: {why}"):
                continue
            closed.append(stream.stream_id)
            self.closed.inc()
            self.events.record(
                "stuck_stream",
                f"closed stream {stream.stream_id} of node {stream.node_id} ({stream.peer}): {why}",
                node=stream.node_id,
                stream=stream.stream_id,
                peer=stream.peer,
                type_url=oldest.type_url,
            )
        return closed
