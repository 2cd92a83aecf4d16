"""NACKs grouped by the version they rejected, with the change that made that version.

When every node rejects a version (a NACK storm), operators need one line: which change, how
many nodes, what Envoy said. The server never answers a NACK by resending the rejected version
(see controlplane/xds/stream.py); this module only records. The first NACK of a version is an
event naming the change; the group is at `GET /nacks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.events import EventLog
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Cause
from controlplane.xds.server import StreamCallbacks
from controlplane.xds.stream import RequestKind, RequestOutcome, StreamState

MAX_GROUPS = 100
MAX_NODES_LISTED = 20
MAX_ERRORS = 5


@dataclass(slots=True)
class NackGroup:
    """Every NACK of one (type, version)."""

    type_url: str
    version: str
    cause: Cause | None
    first: float
    last: float
    nacks: int = 0
    nodes: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)  # distinct Envoy messages, first few

    def to_json(self) -> dict[str, Any]:
        cause = self.cause
        return {
            "type": rs.SHORT_NAMES.get(self.type_url, self.type_url),
            "version": self.version,
            "change": None if cause is None else {"kind": cause.kind, "detail": cause.detail, "time": cause.time},
            "nacks": self.nacks,
            "nodes": len(self.nodes),
            "node_sample": sorted(self.nodes)[:MAX_NODES_LISTED],
            "errors": [{"error": e, "count": n} for e, n in self.errors.items()],
            "first": self.first,
            "last": self.last,
        }


def _describe(cause: Cause | None) -> str:
    return "a change no longer in the history" if cause is None else f"{cause.kind}: {cause.detail}"


class NackGroups(StreamCallbacks):
    """Groups NACKs by rejected (type, version); `cause_of` finds the change behind a version."""

    def __init__(self, events: EventLog, cause_of: Callable[[str], Cause | None]) -> None:
        self.events = events
        self.cause_of = cause_of
        self.groups: dict[tuple[str, str], NackGroup] = {}

    def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
        if outcome.kind is not RequestKind.NACK:
            return
        ts = stream.types[outcome.type_url]
        version = ts.last_nack.version if ts.last_nack is not None else (ts.sent_version or "")
        key = (outcome.type_url, version)
        now = ts.last_nack.time if ts.last_nack is not None else 0.0
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = NackGroup(outcome.type_url, version, self.cause_of(version), now, now)
            for old in list(self.groups)[:-MAX_GROUPS]:
                del self.groups[old]
            self.events.record(
                "nack_version",
                f"{rs.SHORT_NAMES.get(outcome.type_url, outcome.type_url)} version {version} rejected "
                f"(first by node {stream.node_id}); the change: {_describe(group.cause)}; Envoy said: {outcome.error}",
                type_url=outcome.type_url,
                rejected_version=version,
                change=_describe(group.cause),
                node=stream.node_id,
                error=outcome.error,
            )
        group.nacks += 1
        group.last = now
        if stream.node_id is not None:
            group.nodes.add(stream.node_key)
        error = outcome.error or ""
        if error in group.errors or len(group.errors) < MAX_ERRORS:
            group.errors[error] = group.errors.get(error, 0) + 1

    def to_json(self) -> list[dict[str, Any]]:
        return [g.to_json() for g in sorted(self.groups.values(), key=lambda g: g.last, reverse=True)]
