"""What every admin API handler shares: the control plane's view and app key, JSON answers, 4xx
errors, who makes a change, and the one parser of whole-number parameters.

Errors are `{"error": "...", "field": "..."}` with a 4xx status, so a client always learns what
was wrong and where.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from controlplane.events import EventLog
from controlplane.health.admission import Admission
from controlplane.health.alarms import Alarm
from controlplane.health.passive import PassiveState
from controlplane.health.store import HealthStatus, HealthStore
from controlplane.observe.metrics import Metrics
from controlplane.observe.nacks import NackGroups
from controlplane.observe.nodes import NodeRegistry
from controlplane.observe.propagation import PropagationTracker
from controlplane.probers.link import ProberLinkService
from controlplane.probers.sources import LocalProber
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import Snapshot
from controlplane.store.changes import OperatorStore
from controlplane.store.replicas import ReplicaRecord
from controlplane.topology.model import Topology


class ControlPlaneView(Protocol):
    """The control plane as the admin API sees and changes it (`controlplane.app.ControlPlane` is one)."""

    # What is served and why
    @property
    def topology(self) -> Topology: ...
    @property
    def config_path(self) -> Path | None: ...
    @property
    def snapshot(self) -> Snapshot: ...
    @property
    def cache(self) -> SnapshotCache: ...
    @property
    def health(self) -> HealthStore: ...
    @property
    def events(self) -> EventLog: ...
    @property
    def metrics(self) -> Metrics: ...
    # Who sees it
    @property
    def nodes(self) -> NodeRegistry: ...
    @property
    def propagation(self) -> PropagationTracker | None: ...
    @property
    def nacks(self) -> NackGroups: ...
    # Where verdicts come from
    @property
    def admission(self) -> Admission: ...
    @property
    def prober_link(self) -> ProberLinkService: ...
    @property
    def local_prober(self) -> LocalProber | None: ...
    @property
    def expect_remote_prober(self) -> bool: ...
    @property
    def store(self) -> OperatorStore:
        """Where operator changes are written (this replica, or etcd for every replica)."""
        ...

    def replica_record(self) -> ReplicaRecord:
        """This replica as GET /replicas shows it (id, addresses, version, EDS digest)."""
        ...

    def passive_state(self, cluster: str, endpoint: str) -> PassiveState | None:
        """A copy of one endpoint's passive counters and ejection; None when its cluster has no `passive`."""
        ...

    # Changes
    def set_override(
        self, cluster: str, endpoint: str, status: HealthStatus | None, *, who: str = "operator"
    ) -> Snapshot | None: ...

    def update_topology(
        self, topology: Topology, *, detail: str = "topology updated", who: str = "file watcher"
    ) -> Snapshot | None: ...

    def reload(self, *, who: str = "file watcher") -> Snapshot | None: ...

    def accept_alarm(self, alarm_id: int, *, who: str) -> tuple[Alarm, Snapshot | None]: ...

    def forget_prober(self, prober_id: str, *, who: str) -> Snapshot | None: ...


CP_KEY: web.AppKey[ControlPlaneView] = web.AppKey("controlplane")


def control_plane(request: web.Request) -> ControlPlaneView:
    """The ControlPlaneView an admin request is for."""
    return request.app[CP_KEY]


def error_response(status: int, message: str, field: str = "") -> web.Response:
    """A JSON error naming the problem and, where there is one, the field."""
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status)


def json_response(data: Any) -> web.Response:
    """A compact JSON answer."""
    # Compact: with `indent` the json module falls back to its pure-Python encoder, 3.5x slower on
    # the 10,000-row answers the views give (bench/admin.py); pipe through `jq` to read.
    return web.json_response(data, dumps=compact_json)


def compact_json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


WHO_HEADER = "X-Healthplane-Who"


def who(request: web.Request, body: Any = None) -> str:
    """Who makes a change: the X-Healthplane-Who header, else the body's "who", else the peer address."""
    named = request.headers.get(WHO_HEADER, "").strip()
    if not named and isinstance(body, dict) and isinstance(body.get("who"), str):
        named = body["who"].strip()
    peer = request.remote or "unknown"
    return f"{named[:100]} ({peer})" if named else peer


# --------------------------------------------------------------------------- whole-number parameters

MAX_LIMIT = 10_000  # the most rows any `?limit=` asks for (the event log keeps 10,000)
MAX_REFRESH = 3600  # seconds; a page reloading less often than hourly is not a status page


def bad_request(message: str, field: str) -> web.HTTPBadRequest:
    """A 400 to raise from a handler, with the same JSON body as `error_response`."""
    return web.HTTPBadRequest(text=compact_json({"error": message, "field": field}), content_type="application/json")


def whole_number(text: str, name: str, *, low: int, high: int | None = None, field: str = "") -> int:
    """`text` as an integer in low..high (no high: no upper bound), written with ASCII digits only.

    The one rule for every whole-number parameter of the admin API (limits, refresh periods,
    event ids): anything else raises a 400 (`bad_request`) naming `name` and its range.
    """
    if text.isascii() and text.isdigit():
        value = int(text)
        if value >= low and (high is None or value <= high):
            return value
    wanted = f"a whole number in {low}..{high}" if high is not None else f"a whole number >= {low}"
    raise bad_request(f"{name} must be {wanted}, not {text[:40]!r}", field or name)


def query_int(request: web.Request, name: str, *, default: int, low: int, high: int | None = None) -> int:
    """The query parameter `name` under the one rule of `whole_number`; `default` when absent or empty."""
    text = request.query.get(name, "")
    return default if text == "" else whole_number(text, name, low=low, high=high)
