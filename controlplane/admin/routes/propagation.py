"""Admin routes for propagation: `/versions`, `/versions/{version}`, and the `/propagation` page.

The data comes from the control plane's `PropagationTracker`; the page from the pure
`controlplane.observe.chart`. Nodes' lag is added to `/nodes` through `node_lag`.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from controlplane.admin.http import (
    MAX_LIMIT,
    MAX_REFRESH,
    ControlPlaneView,
    control_plane,
    error_response,
    json_response,
    query_int,
)
from controlplane.observe.chart import report_html
from controlplane.observe.propagation import PropagationTracker

DEFAULT_REPORT_VERSIONS = 10


def _tracker(request: web.Request) -> PropagationTracker | web.Response:
    tracker = control_plane(request).propagation
    if tracker is None:
        return error_response(404, "propagation is not measured by this control plane")
    return tracker


def node_lag(cp: ControlPlaneView, node: str) -> dict[str, Any] | None:
    """How far behind `node` is (versions and ms), for `/nodes`; None when nothing is measured."""
    return None if cp.propagation is None else cp.propagation.lag(node).to_json()


async def versions(request: web.Request) -> web.Response:
    tracker = _tracker(request)
    if isinstance(tracker, web.Response):
        return tracker
    limit = query_int(request, "limit", default=tracker.limit, low=1, high=MAX_LIMIT)
    now = time.time()
    return json_response(
        {
            "tracked": tracker.limit,
            "current": control_plane(request).snapshot.version,
            "versions": [r.summary(now) for r in tracker.recent(limit)],
        }
    )


async def version(request: web.Request) -> web.Response:
    tracker = _tracker(request)
    if isinstance(tracker, web.Response):
        return tracker
    wanted = request.match_info["version"]
    record = tracker.get(wanted)
    if record is None:
        return error_response(404, f"no tracked version {wanted!r} (only the last {tracker.limit} are kept)", "version")
    return json_response(record.detail(time.time()))


async def propagation_page(request: web.Request) -> web.Response:
    tracker = _tracker(request)
    if isinstance(tracker, web.Response):
        return tracker
    limit = query_int(request, "limit", default=DEFAULT_REPORT_VERSIONS, low=1, high=MAX_LIMIT)
    refresh = query_int(request, "refresh", default=0, low=0, high=MAX_REFRESH)
    now = time.time()
    details = [r.detail(now) for r in tracker.recent(limit)]
    return web.Response(text=report_html(details, now=now, refresh=refresh), content_type="text/html")
