"""What every admin API handler shares: the control plane's view and app key, JSON answers, 4xx errors.

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
from controlplane.health.store import HealthStatus, HealthStore
from controlplane.observe.metrics import Metrics
from controlplane.observe.nacks import NackGroups
from controlplane.observe.nodes import NodeRegistry
from controlplane.observe.propagation import PropagationTracker
from controlplane.probers.link import ProberLinkService
from controlplane.probers.sources import LocalProber
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import Snapshot
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
