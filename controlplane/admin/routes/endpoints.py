"""Admin routes for endpoints: `/endpoints` (every endpoint with its status, why, and its checks,
filtered by cluster and status) and `POST /endpoints/{cluster}/{endpoint}/override`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from controlplane.admin.auth import authorize_change
from controlplane.admin.http import ControlPlaneView, control_plane, error_response, json_response, who
from controlplane.admin.views import CheckLookup, endpoint_rows, parse_status_filter
from controlplane.errors import ConfigError, StoreUnavailable
from controlplane.health.checks import CheckInfo
from controlplane.health.store import HealthStatus
from controlplane.store.changes import OverrideChange
from controlplane.topology.addresses import split_host_port

# What an operator may pin. UNKNOWN and TIMEOUT are what checks report: a pinned UNKNOWN would
# be served as healthy forever by an operator who meant "clear" (that is `auto`), and a pinned
# TIMEOUT says a check timed out when none ran. Overrides of those saved before this rule still load.
PINNABLE = (HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.DRAINING, HealthStatus.DEGRADED)
PIN_CHOICES = "an override is HEALTHY, UNHEALTHY, DRAINING or DEGRADED, or auto to clear it"


def check_lookup(cp: ControlPlaneView) -> CheckLookup:
    """A function (cluster, endpoint) -> CheckInfo | None from the local prober or remote probers."""
    local = cp.local_prober
    remote: dict[tuple[str, str], CheckInfo] = cp.prober_link.checks

    def lookup(cluster: str, endpoint: str) -> CheckInfo | None:
        if local is not None:
            info = local.check_info(cluster, endpoint)
            if info is not None:
                return info
        return remote.get((cluster, endpoint))

    return lookup


def filtered_rows(request: web.Request) -> list[dict[str, Any]] | web.Response:
    """`/endpoints` rows under the request's `?cluster=` and `?status=` (also the status page's rows)."""
    cp = control_plane(request)
    try:
        status = parse_status_filter(request.query.get("status"))
    except ValueError as exc:
        return error_response(400, str(exc), "status")
    cluster = request.query.get("cluster") or None
    if cluster is not None and cp.snapshot.topology.cluster(cluster) is None:
        return error_response(404, f"no cluster named {cluster!r}", "cluster")
    return endpoint_rows(
        cp.snapshot,
        cp.health.effective,
        check_lookup(cp),
        cluster=cluster,
        status=status,
        passive=cp.passive_state,
        owners=cp.prober_link.owners,
    )


async def endpoints(request: web.Request) -> web.Response:
    rows = filtered_rows(request)
    if isinstance(rows, web.Response):
        return rows
    return json_response({"version": control_plane(request).snapshot.version, "endpoints": rows})


async def override(request: web.Request) -> web.Response:
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = control_plane(request)
    cluster = request.match_info["cluster"]
    parsed = split_host_port(request.match_info["endpoint"])
    if parsed is None:
        return error_response(400, "endpoint must be ADDRESS:PORT", "endpoint")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, 'body must be JSON such as {"status": "UNHEALTHY"}', "body")
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        return error_response(400, 'body needs "status": HEALTHY, UNHEALTHY, DRAINING, DEGRADED or auto', "status")
    text = body["status"]
    status: HealthStatus | None
    if text.lower() == "auto":
        status = None
    else:
        try:
            status = HealthStatus.parse(text)
        except ValueError:
            return error_response(400, f"unknown health status {text!r}: {PIN_CHOICES}", "status")
        if status not in PINNABLE:
            return error_response(400, f"{status.name} is what a check reports, not a pin: {PIN_CHOICES}", "status")
    endpoint = f"{parsed[0]}:{parsed[1]}"
    try:
        snap = await cp.store.submit(OverrideChange(cluster, endpoint, status, who(request, body)))
    except ConfigError as exc:
        return error_response(404, exc.message, exc.path)
    except StoreUnavailable as exc:
        return error_response(503, str(exc), "store")
    h = cp.health.effective(cluster, endpoint)
    return json_response(
        {
            "cluster": cluster,
            "endpoint": endpoint,
            "status": h.status.name,
            "override": h.override.status.name if h.override else None,
            "version": (snap or cp.snapshot).version,
            "changed": snap is not None,
        }
    )
