"""Admin routes for propagation: `/versions`, `/versions/{version}`, and the `/propagation` page.

The data comes from the control plane's `PropagationTracker`; the page from the pure
`controlplane.observe.chart`. Nodes' lag is added to `/nodes` through `node_lag`.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from controlplane.admin.http import ControlPlaneView, control_plane, error_response, json_response
from controlplane.observe.chart import report_html
from controlplane.observe.propagation import PropagationTracker

DEFAULT_REPORT_VERSIONS = 10


def _tracker(request: web.Request) -> PropagationTracker | web.Response:
    tracker = control_plane(request).propagation
    if tracker is None:
        return error_response(404, "propagation is not measured by this control plane")
    return tracker


def _limit(request: web.Request, default: int) -> int | web.Response:
    text = request.query.get("limit", str(default))
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        return error_response(400, "limit must be a whole number >= 1", "limit")
    return int(text)


def node_lag(cp: ControlPlaneView, node: str) -> dict[str, Any] | None:
    """How far behind `node` is (versions and ms), for `/nodes`; None when nothing is measured."""
    return None if cp.propagation is None else cp.propagation.lag(node).to_json()


async def versions(request: web.Request) -> web.Response:
    tracker = _tracker(request)
    if isinstance(tracker, web.Response):
        return tracker
    limit = _limit(request, tracker.limit)
    if isinstance(limit, web.Response):
        return limit
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
    limit = _limit(request, DEFAULT_REPORT_VERSIONS)
    if isinstance(limit, web.Response):
        return limit
    text = request.query.get("refresh", "0")
    if not (text.isascii() and text.isdigit()) or int(text) > 3600:
        return error_response(400, "refresh must be 0..3600 seconds", "refresh")
    now = time.time()
    details = [r.detail(now) for r in tracker.recent(limit)]
    return web.Response(text=report_html(details, now=now, refresh=int(text)), content_type="text/html")


def add_propagation_routes(app: web.Application) -> None:
    app.router.add_get("/versions", versions)
    app.router.add_get("/versions/{version}", version)
    app.router.add_get("/propagation", propagation_page)
